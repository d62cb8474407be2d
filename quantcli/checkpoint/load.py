"""Load any quantcli output (or a plain checkpoint) back, and describe it (writing: :mod:`quantcli.checkpoint.atomic`).

Every quantcli output folder is a standard Hugging Face checkpoint (safetensors + config.json with
its ``quantization_config``) that transformers loads without quantcli, plus ``quantcli.json``:
the method, its settings, the per-layer map and the format version, so ``eval DIR`` needs no flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli.checkpoint.claims import check_claims_on_skeleton
from quantcli.checkpoint.metadata import METADATA_FILE, check_claims, check_metadata_fields, read_metadata, table_layers
from quantcli.errors import CheckpointError, InputError, ModelLoadError, QuantCliError, option
from quantcli.formats import format_names, get_format
from quantcli.sources.models import (
    REMOTE_CODE_HINT,
    bytes_on_disk,
    check_vocab,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
    weight_files,
)

BACKENDS = ("auto", "int8-cpu", "int4-cpu")


def load(
    path: str | Path, device: str = "auto", trust_remote_code: bool = False, backend: str = "auto"
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Load a checkpoint quantcli wrote (or any causal LM): ``(model, tokenizer, metadata)``.

    ``backend="int8-cpu"`` / ``"int4-cpu"`` runs an rtn/gptq INT8 / INT4 checkpoint with torch's
    weight-only integer kernels on CPU (see :mod:`quantcli.quant.cpu_kernels`); ``"auto"`` runs every
    checkpoint with dequantized weights.
    """
    if backend not in BACKENDS:
        raise InputError(f"{option('backend')} must be one of {', '.join(BACKENDS)}, got {backend!r}.")

    source = resolve_model(str(path))
    metadata = read_metadata(Path(source)) if Path(source).is_dir() else None
    if metadata is not None:
        check_metadata_fields(metadata, Path(source) / METADATA_FILE)
    device = pick_device(device)
    if backend != "auto":
        from quantcli.quant.cpu_kernels import convert, kernel_layers

        layers = kernel_layers(backend, metadata, table_layers(metadata), device)  # refuse before the model loads
    try:
        model, tokenizer = _load(source, metadata, device, trust_remote_code), load_tokenizer(source, trust_remote_code)
        check_vocab(model, tokenizer, str(path))
        if metadata is not None:
            check_claims(Path(source), metadata, model)
    except QuantCliError:
        raise
    except Exception as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(REMOTE_CODE_HINT.format(source=path)) from None
        why = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise CheckpointError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {why}). It is corrupt or incomplete:"
            " re-run quantcli quantize, or download it again."
        ) from error
    if backend != "auto":
        model = convert(model, layers, source, backend)
    return model, tokenizer, metadata


def _integer_weights_only(source: str) -> bool:
    """A compressed-tensors checkpoint (any writer) of integer weights and no activation quantization,
    which the library's own decompressors read; plain transformers cannot build asymmetric ones yet."""
    try:
        quantization = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(quantization, dict) or not isinstance(quantization.get("config_groups"), dict):
        return False
    groups = quantization["config_groups"]
    return (
        quantization.get("quant_method") == "compressed-tensors"
        and not quantization.get("sparsity_config")
        and bool(groups)
        and all(
            isinstance(group, dict)
            and (group.get("format") or quantization.get("format")) in ("pack-quantized", "int-quantized")
            and not group.get("input_activations")
            and not group.get("output_activations")
            for group in groups.values()
        )
    )


def _load(source: str, metadata: dict[str, Any] | None, device: str, trust_remote_code: bool) -> Any:

    if metadata is None and Path(source).is_dir() and _integer_weights_only(source):
        metadata = {"format": "compressed-tensors"}
    if metadata is None or metadata.get("format") == "dense":
        dtype = "auto" if metadata else pick_dtype("auto", device)
        return load_model(source, dtype, device, trust_remote_code)
    if metadata.get("format") in format_names():
        return get_format(metadata["format"]).load(source, device, trust_remote_code)
    return load_model(source, "auto", device, trust_remote_code)


def inspect(path: str | Path) -> dict[str, Any]:
    """The metadata of a quantcli checkpoint (method, bits, per-layer map) plus its size on disk."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{path} is not a folder. Pass the output folder of quantcli quantize.")
    metadata = read_metadata(folder)
    if metadata is None:
        raise CheckpointError(
            f"{path} has no {METADATA_FILE}: it was not written by quantcli quantize. Use quantcli eval for any "
            "checkpoint."
        )
    check_metadata_fields(metadata, folder / METADATA_FILE)

    check_claims_on_skeleton(folder, metadata)  # never print claims the checkpoint contradicts
    return {**metadata, "disk_bytes": bytes_on_disk(weight_files(str(folder)))}
