"""Reading a compressed-tensors checkpoint (any writer's) back into a runnable model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError
from quantcli.formats.compressed_tensors.scheme import quiet_library_logs
from quantcli.quant.activations import attach, is_int8_token_dynamic
from quantcli.sources.remote import refuse_remote_code


def load_compressed(folder: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """A dense, runnable model from a compressed-tensors checkpoint, decompressed by the library."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_library_logs()
    folder = Path(folder)
    from quantcli.quant.moe import checkpoint_renamer, refuse, unfuse

    refuse_remote_code(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        raise CheckpointError(f"{folder}/config.json has no quantization_config: not a compressed-tensors checkpoint.")
    del config.quantization_config
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    head = next((name for name, module in model.named_modules() if module is model.get_output_embeddings()), None)
    tied_head = head if config.tie_word_embeddings else None
    unfuse(model)
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    modules = dict(model.named_modules())
    state = _dense_state_dict(folder, quantization, dtype, modules, tied_head, checkpoint_renamer(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    refuse(model)
    tied = {name + ".weight" for name, module in model.named_modules() if module is model.get_output_embeddings()}
    if unexpected or set(missing) - (tied if config.tie_word_embeddings else set()):
        raise CheckpointError(
            f"{folder}: weights do not match the model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}). The checkpoint is corrupt or truncated."
        )
    model.tie_weights()
    _quantize_inputs(model, quantization if isinstance(quantization, dict) else quantization.to_dict())
    return model.to(device).eval()


def _quantize_inputs(model: Any, quantization_config: dict[str, Any]) -> None:
    """W8A8 checkpoints: the layers whose scheme quantizes their inputs per token get them quantized
    at run time (:mod:`quantcli.quant.activations`), as vLLM does when it serves them."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    config = QuantizationConfig.model_validate(quantization_config)
    schemes = [scheme for scheme in config.config_groups.values() if is_int8_token_dynamic(scheme.input_activations)]
    if schemes:
        modules = model.named_modules()
        names = [name for name, module in modules if any(is_match(name, module, s.targets) for s in schemes)]
        attach(model, [name for name in names if name not in set(config.ignore or [])])


def _dense_state_dict(
    folder: Path,
    quantization_config: dict[str, Any],
    dtype: Any,
    modules: dict[str, Any],
    tied_head: str | None = None,
    rename: Any = str,
) -> dict[str, Any]:
    """Every tensor of ``folder``, quantized layers decompressed with their scheme's own compressor
    (schemes target layers by name or by class, e.g. ``Linear``, as llm-compressor writes them)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    config = QuantizationConfig.model_validate(quantization_config)
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update({rename(key): value for key, value in load_file(shard).items()})
    prefixes = {key.rsplit(".", 1)[0] for key in state if key.endswith((".weight_packed", ".weight_scale"))}
    dense: dict[str, Any] = {}
    for prefix in sorted(prefixes):
        module = modules.get(prefix)
        scheme = next(
            (s for s in config.config_groups.values() if module is not None and is_match(prefix, module, s.targets)),
            None,
        )
        if scheme is None:
            raise CheckpointError(
                f"{folder}: layer {prefix} has quantized tensors but no scheme in config.json. The checkpoint is "
                "corrupt; re-run quantcli quantize."
            )
        local = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.rsplit(".", 1)[0] == prefix}
        if prefix == tied_head and "weight" not in local:  # its int8 tensor is the embedding's: tie_weights() gives it
            continue
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        local = {
            key: value.to(dtype) if key == "weight_scale" else value for key, value in local.items()
        }  # 16-bit scales: multiply in the model's dtype, as transformers does
        dense[prefix + ".weight"] = compressor.decompress(local, scheme)["weight"].to(dtype)
    dense.update(
        {
            key: value.to(dtype) if value.is_floating_point() else value
            for key, value in state.items()
            if key.rsplit(".", 1)[0] not in prefixes
        }
    )
    return dense
