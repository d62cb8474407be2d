"""Builders of broken and hostile inputs, all derived from the embedded stories260K checkpoint."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from quantcli.sources.models import EMBEDDED_MODEL


def copy_model(folder: Path) -> Path:
    shutil.copytree(EMBEDDED_MODEL, folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


class _Payload:
    """Unpickling this writes ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def pickle_bomb(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    return path


def remote_code_model(folder: Path, marker: Path) -> Path:
    """A checkpoint whose config points at its own modeling code, which writes ``marker`` on import."""
    copy_model(folder)
    return add_remote_code(folder, marker)


def nan_model(folder: Path, layer: str = "model.layers.1.self_attn.q_proj") -> Path:
    from safetensors.torch import load_file, save_file

    copy_model(folder)
    state = load_file(folder / "model.safetensors")
    state[f"{layer}.weight"][0, 3] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def big_tokenizer_model(folder: Path) -> Path:
    """stories260K (512 embedding rows) with a tokenizer grown to 520 tokens."""
    from transformers import AutoTokenizer

    copy_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    tokenizer.save_pretrained(folder)
    return folder


def quantized_checkpoint(folder: Path, **options) -> Path:
    from quantcli.config.recipes import config_from_mapping
    from quantcli.run.pipeline import quantize

    quantize(config_from_mapping({"bits": 4, "method": "rtn", "output": folder, "eval": None, **options}))
    return folder


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def add_remote_code(folder: Path, marker: Path) -> Path:
    """Point ``folder``'s config at its own modeling code, which writes ``marker`` on import."""
    edit_json(
        folder / "config.json",
        model_type="evil_llama",
        auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    )
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return folder


def remote_code_checkpoint(folder: Path, marker: Path) -> Path:
    """A quantcli compressed-tensors checkpoint (no report.json, so compare evaluates it) with remote code."""
    quantized_checkpoint(folder)
    (folder / "report.json").unlink()
    return add_remote_code(folder, marker)


def edit_weights(folder: Path, edit) -> Path:
    """Apply ``edit(state_dict)`` to ``folder/model.safetensors`` in place."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def one_more_layer(folder: Path) -> Path:
    """config.json declares one decoder layer more than the weights hold."""
    config = json.loads((folder / "config.json").read_text())
    edit_json(folder / "config.json", num_hidden_layers=config["num_hidden_layers"] + 1)
    return folder


def remote_tokenizer_model(folder: Path, marker: Path) -> Path:
    """A clean config.json, but a tokenizer_config.json pointing at the checkpoint's own tokenizer code."""
    copy_model(folder)
    edit_json(
        folder / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["tok_evil.EvilTokenizer", None]},
    )
    (folder / "tok_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder
