"""quantcli.json, the file that makes a checkpoint describe itself: its name, version, writing, reading
and every check of what it claims. No other module spells the file name or its fields' rules.

It holds the method, its settings, the per-layer map, the size breakdown and the format version; ``report.json``
beside it holds the whole quantize report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from quantcli import __version__
from quantcli.errors import CheckpointError, InputError
from quantcli.limits import MAX_METADATA_BYTES, read_bounded
from quantcli.methods import available_methods
from quantcli.sources.integrity import few_names
from quantcli.strict_json import write_json

FORMAT_VERSION = 1
METADATA_FILE = "quantcli.json"
REPORT_FILE = "report.json"


def write_metadata(folder: Path, fields: dict[str, Any]) -> None:
    """Write ``folder/quantcli.json`` from ``fields`` (method, bits, format, options, layers, ...) and the version."""

    write_json(folder / METADATA_FILE, {"format_version": FORMAT_VERSION, "quantcli_version": __version__, **fields})


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """``quantcli.json`` of ``folder``, validated; None for a checkpoint quantcli did not write."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return None
    try:
        metadata = json.loads(read_bounded(path, "checkpoint metadata", MAX_METADATA_BYTES).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path} is corrupt ({why}). Re-run quantcli quantize to rewrite the checkpoint."
        ) from None
    except InputError as error:
        raise CheckpointError(str(error)) from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}.") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{path} has no valid format_version. Re-run quantcli quantize to rewrite the checkpoint."
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this quantcli reads ({FORMAT_VERSION})."
            " Upgrade quantcli: pip install -U quantcli."
        )
    return metadata


def check_metadata_fields(metadata: dict[str, Any], path: Path) -> None:
    """quantcli.json holds the fields every reader uses, with the right types."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is malformed: {what}. Re-run quantcli quantize to rewrite the checkpoint.")

    for key, kind in (("method", str), ("format", str), ("bits", int)):
        value = metadata.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"'{key}' must be {'an integer' if kind is int else 'a string'}")
    layers = metadata.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("bits"), int) for v in layers.values()
    ):
        raise bad("'layers' must map layer names to their settings (bits, scheme)")
    for key in ("options", "skipped"):
        if not isinstance(metadata.get(key) or {}, dict):
            raise bad(f"'{key}' must be a mapping")


def table_layers(metadata: dict[str, Any] | None) -> set[str]:
    """The embedding and head a checkpoint's metadata names (its size breakdown), quantized or kept."""
    breakdown = (metadata or {}).get("size_breakdown")
    return (
        {name for name in (breakdown.get("embedding"), breakdown.get("head")) if name}
        if isinstance(breakdown, dict)
        else set()
    )


def _layer_shape(module: Any) -> tuple[int, int] | None:
    if hasattr(module, "nf") and hasattr(module, "nx"):  # GPT-2 Conv1D
        return (module.nf, module.nx)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return (module.out_features, module.in_features)
    return None


def _scheme_bits(folder: Path, names: Any = ()) -> dict[str, int]:
    """``layer -> num_bits`` of every layer a compressed-tensors config targets by name; a ``re:``
    target (the experts') stands for the ``names`` it matches, or for itself when it matches none."""
    try:
        quantization = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    bits: dict[str, int] = {}
    for group in (quantization.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            for target in group.get("targets") or ():
                matched = [n for n in names if re.match(target[3:], n)] if str(target).startswith("re:") else []
                bits.update(dict.fromkeys(matched or [target], group["weights"].get("num_bits")))
    return bits


def check_claims(folder: Path, metadata: dict[str, Any], model: Any) -> None:
    """quantcli.json's method, bits and per-layer map must agree with the config and the weights."""
    from quantcli.quant.moe import expert_shapes

    path = Path(folder) / METADATA_FILE
    methods = {cls.name for cls in available_methods()}
    method, bits, layers = metadata.get("method"), metadata.get("bits"), metadata.get("layers")
    if method not in methods:
        raise CheckpointError(
            f"{path} names method {str(method)[:40]!r}, which quantcli does not know. The file is corrupt; re-run "
            "quantcli quantize."
        )
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(
            f"{path} has no valid per-layer map ('layers'). The file is corrupt; re-run quantcli quantize."
        )
    tables = table_layers(metadata)  # the embedding/head have their own width (--embeddings)
    layer_bits = {layer.get("bits") for name, layer in layers.items() if name not in tables}
    if not isinstance(bits, int) or isinstance(bits, bool) or (layers and bits not in layer_bits):
        raise CheckpointError(
            f"{path} claims {str(bits)[:20]}-bit but its layers are {sorted(map(str, layer_bits))}-bit. The file is "
            "corrupt; re-run quantcli quantize."
        )
    modules = dict(model.named_modules())
    experts = expert_shapes(model)  # each expert of a fused experts module is a layer of its own
    stored = _scheme_bits(Path(folder), layers) if metadata.get("format") == "compressed-tensors" else {}
    for name, layer in layers.items():
        if name not in modules and name not in experts:
            raise CheckpointError(
                f"{path} lists layer {name[:80]}, which the model does not have. quantcli.json and the weights "
                "disagree; re-run quantcli quantize."
            )
        shape, claimed = experts.get(name) or _layer_shape(modules[name]), layer.get("shape")
        if claimed is not None and shape is not None and tuple(claimed) != shape:
            raise CheckpointError(
                f"{path} says layer {name} is {tuple(claimed)} but the weights are {shape}. quantcli.json and the "
                "weights disagree; re-run quantcli quantize."
            )
        if name in stored and stored[name] != layer.get("bits"):
            raise CheckpointError(
                f"{path} says layer {name} is {layer.get('bits')}-bit but the weights are stored {stored[name]}-bit. "
                "quantcli.json and the weights disagree; re-run quantcli quantize."
            )
    extra = sorted(set(stored) - set(layers))
    if extra:
        raise CheckpointError(
            f"{path} omits quantized layer(s) {few_names(extra)} that config.json targets. quantcli.json and the "
            "weights disagree; re-run quantcli quantize."
        )
