"""A checkpoint must hold exactly the weights its config describes, and a quantcli.json must tell the
truth about them. transformers fills a missing weight with random values and reports it only in a
log line quantcli hides, so every load path checks here and refuses instead: missing, unexpected or
mis-shaped tensors are errors, except weights tied to another one (lm_head to the embedding)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError

_ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")  # buffers old checkpoints still carry


def _few(keys: Any) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def _refuse(source: str, missing: Any = (), unexpected: Any = (), mismatched: Any = ()) -> None:
    parts = []
    if missing:
        parts.append(f"it lacks {len(missing)} weight(s) the config needs ({_few(missing)}), which would be random")
    if unexpected:
        parts.append(f"it holds {len(unexpected)} weight(s) the config has no place for ({_few(unexpected)})")
    if mismatched:
        parts.append("shapes differ from the config: " + "; ".join(sorted(mismatched)[:3]))
    if parts:
        raise CheckpointError(
            f"{source} does not match its config.json: {'; '.join(parts)}. The checkpoint is incomplete or its"
            " config.json is wrong (e.g. more layers than the weights hold): re-download it or fix config.json."
        )


def _ignored(model: Any, keys: set[str]) -> set[str]:
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), *_ALWAYS_IGNORED]
    regex = re.compile("|".join(f"({pattern})" for pattern in patterns))
    return {key for key in keys if not regex.search(key)}


def check_loading_info(info: dict[str, Any], source: str) -> None:
    """Refuse what ``from_pretrained(output_loading_info=True, ignore_mismatched_sizes=True)`` reports."""
    mismatched = []
    for entry in info.get("mismatched_keys") or ():
        key, *shapes = entry if isinstance(entry, (tuple, list)) else (entry,)
        mismatched.append(f"{key} is {' in the file vs '.join(str(tuple(s)) for s in shapes)} in the config" if len(shapes) == 2 else str(key))
    _refuse(source, info.get("missing_keys") or (), info.get("unexpected_keys") or (), mismatched)


def check_streamed(model: Any, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The tensors a streamed (``--low-memory``) read will find, against the meta-device skeleton."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    satisfied = {name for names in aliases.values() if any(n in shapes for n in names) for name in names}
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # target -> source, tied after loading
    satisfied |= {target for target, origin in tied.items() if origin in shapes}
    missing = set(expected) - set(shapes) - satisfied
    unexpected = _ignored(model, set(shapes) - set(expected))
    mismatched = [f"{key} is {shapes[key]} in the file vs {expected[key]} in the config" for key in sorted(set(shapes) & set(expected)) if shapes[key] != expected[key]]
    _refuse(source, missing, unexpected, mismatched)


def _layer_shape(module: Any) -> tuple[int, int] | None:
    if hasattr(module, "nf") and hasattr(module, "nx"):  # GPT-2 Conv1D
        return (module.nf, module.nx)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return (module.out_features, module.in_features)
    return None


def _scheme_bits(folder: Path, names: Any = ()) -> dict[str, int]:
    """``layer -> num_bits`` of every layer a compressed-tensors config targets by name; a ``re:``
    target (the experts') stands for the ``names`` it matches, or for itself when it matches none."""
    import json
    import re

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
    from quantcli.methods import available_methods
    from quantcli.moe import expert_shapes

    path = Path(folder) / "quantcli.json"
    methods = {cls.name for cls in available_methods()}
    method, bits, layers = metadata.get("method"), metadata.get("bits"), metadata.get("layers")
    if method not in methods:
        raise CheckpointError(f"{path} names method {str(method)[:40]!r}, which quantcli does not know. The file is corrupt; re-run quantcli quantize.")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(f"{path} has no valid per-layer map ('layers'). The file is corrupt; re-run quantcli quantize.")
    from quantcli.report import table_layers

    tables = table_layers(metadata)  # the embedding/head have their own width (--embeddings)
    layer_bits = {layer.get("bits") for name, layer in layers.items() if name not in tables}
    if not isinstance(bits, int) or isinstance(bits, bool) or (layers and bits not in layer_bits):
        raise CheckpointError(f"{path} claims {str(bits)[:20]}-bit but its layers are {sorted(map(str, layer_bits))}-bit. The file is corrupt; re-run quantcli quantize.")
    modules = dict(model.named_modules())
    experts = expert_shapes(model)  # each expert of a fused experts module is a layer of its own
    stored = _scheme_bits(Path(folder), layers) if metadata.get("format") == "compressed-tensors" else {}
    for name, layer in layers.items():
        if name not in modules and name not in experts:
            raise CheckpointError(f"{path} lists layer {name[:80]}, which the model does not have. quantcli.json and the weights disagree; re-run quantcli quantize.")
        shape, claimed = experts.get(name) or _layer_shape(modules[name]), layer.get("shape")
        if claimed is not None and shape is not None and tuple(claimed) != shape:
            raise CheckpointError(f"{path} says layer {name} is {tuple(claimed)} but the weights are {shape}. quantcli.json and the weights disagree; re-run quantcli quantize.")
        if name in stored and stored[name] != layer.get("bits"):
            raise CheckpointError(f"{path} says layer {name} is {layer.get('bits')}-bit but the weights are stored {stored[name]}-bit. quantcli.json and the weights disagree; re-run quantcli quantize.")
    extra = sorted(set(stored) - set(layers))
    if extra:
        raise CheckpointError(f"{path} omits quantized layer(s) {_few(extra)} that config.json targets. quantcli.json and the weights disagree; re-run quantcli quantize.")


def file_shapes(where: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """``tensor -> shape`` read from the safetensors headers only (no tensor data is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(where.values())):
        with safe_open(file, framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def check_metadata_fields(metadata: dict[str, Any], path: Path) -> None:
    """quantcli.json holds the fields every reader uses, with the right types."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is malformed: {what}. Re-run quantcli quantize to rewrite the checkpoint.")

    for key, kind in (("method", str), ("format", str), ("bits", int)):
        value = metadata.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"'{key}' must be {'an integer' if kind is int else 'a string'}")
    layers = metadata.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) and isinstance(v.get("bits"), int) for v in layers.values()):
        raise bad("'layers' must map layer names to their settings (bits, scheme)")
    for key in ("options", "skipped"):
        if not isinstance(metadata.get(key) or {}, dict):
            raise bad(f"'{key}' must be a mapping")


def check_same_vocabulary(name: str, model: Any, tokenizer: Any, base: str, base_model: Any, base_tokenizer: Any) -> None:
    """KL and top-1 agreement compare the two models token by token: they need one vocabulary."""
    from quantcli.errors import InputError, option

    rows = model.get_output_embeddings().weight.shape[0]
    base_rows = base_model.get_output_embeddings().weight.shape[0]
    if rows != base_rows or tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise InputError(
            f"{option('base', base)} has another vocabulary than {name} ({base_rows} vs {rows} output rows, or different tokens):"
            f" KL divergence and top-1 agreement need the same tokens. Pass the model it was quantized from as {option('base')}."
        )
