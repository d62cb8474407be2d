"""How much of a model's weights a run quantized: no silent non-quantization, for any model.

The matmul weights are every parameter of two or more dimensions (Linear, Conv1D, embeddings, fused
experts, routers), each tied tensor once. A weight counts as quantized when its layer is stored below
16 bits (a layer written dense, like GPT-2's fake-quantized Conv1D, does not). What stays in full
precision is listed by reason; when more than :data:`WARN_SHARE` of it stays so for reasons the user did
not ask for (``--skip-modules``, ``--embeddings keep``), the report carries a one-line warning.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from quantcli.quant.layers import TABLE_KEPT

WARN_SHARE = 0.05
DENSE_NOTE = "stored dense"


def _owner(model: Any) -> dict[int, tuple[str, Any]]:
    """``id(parameter) -> (owning module name, parameter)`` for every parameter of 2+ dimensions, once."""
    owners: dict[int, tuple[str, Any]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            if parameter.dim() >= 2 and id(parameter) not in owners:
                owners[id(parameter)] = (name, parameter)
    return owners


def _asked(name: str, reason: str, skip_globs: tuple[str, ...], embeddings: Any) -> bool:
    """Whether the user asked for ``name`` to stay full precision: a --skip-modules glob, or an explicit
    ``embeddings="keep"`` for a kept table (the default keeps it too, unasked, and is warned about)."""
    return any(fnmatch.fnmatchcase(name, glob) for glob in skip_globs) or (
        embeddings == "keep" and reason.endswith(TABLE_KEPT)
    )


def weight_coverage(
    model: Any,
    layers: dict[str, Any],
    skipped: dict[str, str],
    skip_globs: tuple[str, ...] = (),
    embeddings: Any = 8,
    bits: int = 4,
    packed: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The share of matmul weight parameters quantized (``packed``: modules a format stores in blocks
    beside the layer map), what stays full precision and why, and (below
    16 bits: a cast asks for full precision) a warning when the part nobody asked to keep exceeds :data:`WARN_SHARE`."""
    import math

    quantized = 0
    stored: set[str] = set(packed)  # modules a format stores in blocks outside the layer map (GGUF's token embedding)
    quantized_modules = dict(model.named_modules())
    for name in packed:
        quantized += sum(p.numel() for p in quantized_modules[name].parameters(recurse=False) if p.dim() >= 2)
    kept: dict[str, int] = {}
    unasked = 0
    for name, layer in layers.items():
        note = layer.note or ""
        if layer.bits < 16 and layer.shape and DENSE_NOTE not in note and not note.startswith("tied to"):
            quantized += math.prod(layer.shape)
            stored.add(name)
    for owner, parameter in _owner(model).values():
        if owner in stored or any(
            name.startswith(owner + ".") for name in stored
        ):  # fused experts: their per-expert layers
            continue
        note = (layers[owner].note or "") if owner in layers else ""
        reason = skipped.get(owner) or (
            note if DENSE_NOTE in note else "not a layer any method quantizes (e.g. position embeddings)"
        )
        kept[reason] = kept.get(reason, 0) + parameter.numel()
        if not _asked(owner, reason, skip_globs, embeddings):
            unasked += parameter.numel()
    total = quantized + sum(kept.values())
    share = unasked / total if total else 0.0
    warning = None
    if share > WARN_SHARE and bits < 16:
        top = max(kept, key=kept.get)
        warning = (
            f"{share:.0%} of the matmul weights stay in full precision without being asked; the largest part: {top}"
        )
    return {
        "matmul_parameters": total,
        "quantized_parameters": quantized,
        "quantized_share": quantized / total if total else 0.0,
        "kept_parameters": dict(sorted(kept.items(), key=lambda item: -item[1])),
        "unasked_share": share,
        "warning": warning,
    }
