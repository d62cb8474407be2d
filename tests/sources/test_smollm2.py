"""The real model, SmolLM2-135M-Instruct, made by `make smollm2` (found through $QUANTCLI_SMOLLM2, else
.models/): it answers, its weights are exactly the GGUF's dequantized tensors, and quantcli reads the
GGUF itself as the same model. Skipped with the reason when the model is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.support.models import REPO, SMOLLM2, WIKI_EVAL

FOLDER = SMOLLM2
GGUF = Path(os.environ.get("QUANTCLI_SMOLLM2_GGUF") or REPO / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
WIKITEXT = WIKI_EVAL
needs_folder = pytest.mark.skipif(
    not (FOLDER / "config.json").is_file(), reason=f"no SmolLM2 at {FOLDER}: run `make smollm2` or set QUANTCLI_SMOLLM2"
)
needs_gguf = pytest.mark.skipif(
    not GGUF.is_file(), reason=f"no SmolLM2 GGUF at {GGUF}: run `make smollm2` or set QUANTCLI_SMOLLM2_GGUF"
)
opt_in = pytest.mark.skipif(  # keeps the real-model tests in `make test` to about 80 s
    not os.environ.get("QUANTCLI_SLOW_TESTS"),
    reason="reads the 98 MB GGUF through transformers (~40 s of CPU): set QUANTCLI_SLOW_TESTS=1",
)


@needs_folder
def test_smollm2_answers_paris():
    from quantcli.checkpoint.load import load

    model, tokenizer, _ = load(FOLDER, "cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


@needs_folder
@needs_gguf
def test_weights_are_the_ggufs_dequantized_tensors():
    """Every tensor, dequantized by the gguf package itself, equals the folder's (q/k rows permuted back)."""
    pytest.importorskip("gguf")
    import gguf
    from safetensors.torch import load_file

    from tests.support.gguf_files import dequantized_tensors, permute_rotary

    config = json.loads((FOLDER / "config.json").read_text())
    expected = dequantized_tensors(GGUF)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    weights = load_file(FOLDER / "model.safetensors")
    assert len(weights) == len(expected) == 272
    for name, tensor in weights.items():
        data = tensor.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute_rotary(
                data, config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            )
        assert (data == expected[names.get_name(name, try_suffixes=(".weight",))]).all(), name


@pytest.mark.slow
@opt_in
@needs_folder
@needs_gguf
def test_quantcli_reads_the_gguf_as_the_folder():
    """quantcli.load on the GGUF gives the folder's weights and token ids, and names the source type."""
    from safetensors.torch import load_file

    from quantcli.checkpoint.load import load
    from quantcli.sources.gguf_input import describe
    from quantcli.sources.models import load_tokenizer

    model, tokenizer, _ = load(GGUF, "cpu")
    weights = load_file(FOLDER / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in weights.items())
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    assert tokenizer(text).input_ids == load_tokenizer(str(FOLDER))(text).input_ids
    assert describe(GGUF) == {
        "format": "gguf",
        "file_type": "MOSTLY_Q4_1",
        "tensor_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1},
    }
