"""What each tensor may be stored as, and exactly how many bytes each choice takes on disk.

A candidate is ``keep`` (the tensor as loaded) or ``intB[-gG]``: B-bit integers (3, 4 or 8) in
groups of G inputs (per channel without ``-g``), rounded by the run's method (rtn or gptq) with its
symmetry and observer. Group sizes go through :func:`quantcli.quant.intgrid.group_size_for`, so two
candidates that land on the same layout for a tensor (``int4-g128`` and ``int4-g64`` on a
576-wide layer) are one choice there.

Bytes are the compressed-tensors tensors the checkpoint stores (see
:func:`quantcli.formats.compressed_tensors.writer.compress_layer`): ``weight`` int8 (an 8-bit
embedding/head, W8A8), or ``weight_packed`` int32 words plus ``weight_shape`` (weight-only linears,
8 bits included); ``weight_scale`` in the model dtype; zero points when asymmetric.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from quantcli.quant.layers import weight_matrix
from quantcli.safetensors_dtypes import FROM_TORCH as _DTYPES
from quantcli.safetensors_dtypes import WIDTHS as _BYTES

if TYPE_CHECKING:
    from quantcli.quant.intgrid import IntLayout


def stored_bytes(layout: IntLayout | None, out_features: int, in_features: int, dtype_bytes: int) -> int:
    """Bytes on disk of one weight stored as ``layout`` (None: kept in a dtype of ``dtype_bytes``; the
    scales are in ``layout.scale_dtype``, else in that dtype too)."""
    if layout is None:
        return out_features * in_features * dtype_bytes
    groups = 1 if layout.group_size is None else in_features // layout.group_size
    scales = out_features * groups * (_BYTES[_DTYPES[layout.scale_dtype]] if layout.scale_dtype else dtype_bytes)
    if layout.bits == 8 and (layout.table or layout.activations):  # int-quantized: plain int8 (storage_kind)
        return out_features * in_features + scales + (0 if layout.symmetric else out_features * groups)
    packed = out_features * math.ceil(in_features * layout.bits / 32) * 4 + 2 * 8  # words + weight_shape (int64 x2)
    zero_points = 0 if layout.symmetric else math.ceil(out_features * layout.bits / 32) * groups * 4
    return packed + scales + zero_points


_SAFETENSORS_RANK = (
    "I8",
    "F16",
    "BF16",
    "I32",
    "F32",
    "I64",
)  # the order of safetensors' Dtype enum; it writes the highest first


def _layer_tensors(
    name: str, layout: IntLayout, out_features: int, in_features: int, held: str
) -> list[tuple[str, str, tuple[int, ...], int]]:
    """``(key, dtype, shape, bytes)`` of each tensor compressed-tensors writes for one layer whose
    weight is held in ``held`` (the scales' dtype unless ``layout.scale_dtype`` names one)."""
    groups = 1 if layout.group_size is None else in_features // layout.group_size
    scale_dtype = _DTYPES[layout.scale_dtype] if layout.scale_dtype else held
    size = _BYTES[scale_dtype]
    tensors = [(f"{name}.weight_scale", scale_dtype, (out_features, groups), out_features * groups * size)]
    if layout.bits == 8 and (layout.table or layout.activations):  # int-quantized (storage_kind)
        tensors.append((f"{name}.weight", "I8", (out_features, in_features), out_features * in_features))
        if not layout.symmetric:
            tensors.append((f"{name}.weight_zero_point", "I8", (out_features, groups), out_features * groups))
        return tensors
    words = math.ceil(in_features * layout.bits / 32)
    tensors += [
        (f"{name}.weight_packed", "I32", (out_features, words), out_features * words * 4),
        (f"{name}.weight_shape", "I64", (2,), 16),
    ]
    if not layout.symmetric:
        rows = math.ceil(out_features * layout.bits / 32)
        tensors.append((f"{name}.weight_zero_point", "I32", (rows, groups), rows * groups * 4))
    return tensors


def checkpoint_bytes(model: object, layouts: dict[str, IntLayout | None], kept_dtype: str | None = None) -> int:
    """Bytes of the one safetensors file a compressed-tensors save of ``model`` writes when each layer
    in ``layouts`` is stored that way (None: kept): every tensor's data plus the JSON header, whose
    length depends on the tensors' names, shapes and offsets. Tied tensors are stored once; a head
    tied to a quantized embedding stores its own copy of the row scales. Floating-point tensors no
    layout owns are stored in ``kept_dtype`` (e.g. ``bfloat16``; None: as held)."""
    import json

    modules = dict(model.named_modules())  # type: ignore[attr-defined]
    tensors, owners = [], {}
    for key, tensor in model.state_dict(keep_vars=True).items():  # type: ignore[attr-defined]
        owner = key.rsplit(".", 1)[0]
        if tensor.data_ptr() in owners:
            first = owners[tensor.data_ptr()]
            if key.endswith(".weight") and layouts.get(first) is not None:  # the tied head: its scales again
                out_features, in_features = weight_matrix(modules[first]).shape
                tensors += [
                    (t[0].replace(first, owner, 1), *t[1:])
                    for t in _layer_tensors(
                        first,
                        layouts[first],
                        out_features,
                        in_features,
                        _DTYPES[str(tensor.dtype).removeprefix("torch.")],
                    )
                    if t[0].endswith("weight_scale")
                ]
            continue
        owners[tensor.data_ptr()] = owner
        dtype = _DTYPES[str(tensor.dtype).removeprefix("torch.")]
        if key.endswith(".weight") and layouts.get(owner) is not None:
            out_features, in_features = weight_matrix(modules[owner]).shape
            tensors += _layer_tensors(owner, layouts[owner], out_features, in_features, dtype)
        else:
            stored = _DTYPES[kept_dtype] if kept_dtype and tensor.is_floating_point() else dtype
            size = tensor.numel() * _BYTES.get(stored, tensor.element_size())
            tensors.append((key, stored, tuple(tensor.shape), size))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape, size in sorted(
        tensors, key=lambda t: (-_SAFETENSORS_RANK.index(t[1]), t[0])
    ):  # safetensors' own order
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset
