"""llama.cpp's legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) as grids quantcli's methods round onto.

Each row is cut into blocks of 32 consecutive inputs; a block stores an fp16 scale ``d`` (and, for
the ``_1`` types, an fp16 minimum ``m``) and one code per weight, worth ``d * (code - offset)``
(``_0`` types; Q8_0 has signed codes and no offset) or ``d * code + m`` (``_1`` types).

The scales are llama.cpp's reference quantizer's (``ggml-quants.c``, mirrored by the ``gguf``
package): ``_0`` types take the block's value of largest magnitude, with its sign, as ``-offset·d``
(Q8_0: ``d = max|w| / 127``); ``_1`` types span the block's min..max. :func:`round_to_nearest` is
that quantizer, code for code (tested bit for bit against ``gguf.quants``); :class:`FixedGrid`
keeps those scales and lets GPTQ choose the codes (:func:`quantcli.quant.gptq_solver.gptq_on_grid`).
:func:`pack` lays codes and scales out as the type's blocks (tested against ``gguf``'s dequantizer).
Each type object rounds (``kind.round``) and gives its grid (``kind.grid``); each record dequantizes and
packs itself, so callers dispatch on the object, never on its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

BLOCK = 32  # inputs per block in every legacy type


@dataclass(frozen=True)
class BlockType:
    """One legacy type: ``bits`` per code, codes in ``lowest..highest``, ``offset`` subtracted before
    scaling, and whether blocks carry a minimum."""

    name: str
    bits: int
    lowest: int
    highest: int
    offset: int
    has_min: bool

    def round(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> BlockWeights:
        return round_to_nearest(matrix, self, importance)

    def grid(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> FixedGrid:
        return FixedGrid(matrix, self, importance)


LEGACY = {
    "Q8_0": BlockType("Q8_0", 8, -127, 127, 0, False),
    "Q4_0": BlockType("Q4_0", 4, 0, 15, 8, False),
    "Q4_1": BlockType("Q4_1", 4, 0, 15, 0, True),
    "Q5_0": BlockType("Q5_0", 5, 0, 31, 16, False),
    "Q5_1": BlockType("Q5_1", 5, 0, 31, 0, True),
}


@dataclass
class BlockWeights:
    """A layer on a legacy grid: ``codes`` (int8, ``[out, in]``), fp16 ``scale`` and, for ``_1``
    types, fp16 ``minimum`` per block (``[out, in / 32]``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    type: BlockType

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def pack(self) -> np.ndarray:
        return pack(self)


def _blocks(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.shape[1] % BLOCK:
        raise InputError(f"a GGUF block type needs in_features divisible by {BLOCK}, got {matrix.shape[1]}.")
    return matrix.detach().float().reshape(matrix.shape[0], -1, BLOCK)


def _reference_scales(blocks: torch.Tensor, kind: BlockType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``d`` (and ``m``) per block, ``[rows, blocks, 1]``, as llama.cpp's reference quantizer computes them."""
    import torch

    if kind.has_min:
        low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
        return (high - low) / kind.highest, low
    if kind.offset == 0:  # Q8_0
        return blocks.abs().amax(dim=-1, keepdim=True) / kind.highest, None
    signed_max = torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True))  # the first of equal magnitudes
    return signed_max / -kind.offset, None


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)


def round_to_nearest(matrix: torch.Tensor, kind: BlockType, importance: torch.Tensor | None = None) -> BlockWeights:
    """llama.cpp's quantization of ``matrix`` (``[out, in]``, ``in`` a multiple of 32). Without ``importance``
    its reference quantizer: codes from the fp32 scales, rounded as ``ggml-quants.c`` rounds them (half away
    from zero for Q8_0, ``trunc(x + 0.5)`` on shifted non-negative values otherwise). With ``importance``
    (``[in]``, llama.cpp's imatrix: each input's mean square) its imatrix quantizer
    (``quantize_row_q4_0_impl`` ...; Q8_0 has none): :func:`_importance_search`."""
    import torch

    blocks = _blocks(matrix)
    if importance is not None and kind.name != "Q8_0":
        return _importance_search(blocks, importance, kind, matrix.shape)
    scale, low = _reference_scales(blocks, kind)
    inverse = _inverse(scale)
    if kind.has_min:
        codes = torch.trunc((blocks - low) * inverse + 0.5)
    elif kind.offset:
        codes = torch.trunc(blocks * inverse + (kind.offset + 0.5))
    else:
        scaled = blocks * inverse
        magnitude = scaled.abs()
        codes = torch.sign(scaled) * (torch.floor(magnitude) + torch.floor(2 * (magnitude - torch.floor(magnitude))))
    codes = codes.clamp(kind.lowest, kind.highest).to(torch.int8).reshape(matrix.shape)
    return BlockWeights(codes, scale[..., 0].half(), None if low is None else low[..., 0].half(), kind)


def _importance_search(blocks: torch.Tensor, importance: torch.Tensor, kind: BlockType, shape: Any) -> BlockWeights:
    """Each block's scale (and minimum) and codes from llama.cpp's search weighted by
    ``importance·sqrtf(sigma2 + x²)``, ``sigma2`` the row's mean square: ``make_qx_quants`` for the
    ``_0`` types, ``make_qkx3_quants`` for the ``_1`` types; the codes are the search's."""
    import torch

    from quantcli.formats.gguf import scale_search as search

    rows, count = blocks.shape[0], blocks.shape[1]
    flat = blocks.reshape(rows, -1)
    sigma2 = search.div(search.total(flat * flat), flat.shape[1])[:, None]
    weights = search.importance_weights(blocks, importance.float().to(blocks.device).reshape(count, BLOCK), sigma2)
    x, weights = blocks.reshape(-1, BLOCK), weights.reshape(-1, BLOCK)
    if kind.has_min:
        scale, minimum, codes = search.with_min(x, weights, kind.highest, -0.9, 0.05, 36)
        low = (-minimum).reshape(rows, count).half()
    else:
        scale, codes = search.signed(x, kind.offset, weights)
        codes, low = codes + kind.offset, None
    return BlockWeights(codes.to(torch.int8).reshape(shape), scale.reshape(rows, count).half(), low, kind)


def dequantize(record: BlockWeights) -> torch.Tensor:
    """The fp32 ``[out, in]`` values llama.cpp computes with (``gguf``'s dequantizer's arithmetic)."""
    rows = record.codes.shape[0]
    codes = record.codes.float().reshape(rows, -1, BLOCK) - record.type.offset
    values = record.scale.float()[..., None] * codes
    if record.minimum is not None:
        values = values + record.minimum.float()[..., None]
    return values.reshape(record.codes.shape)


class FixedGrid:
    """A layer's grid with llama.cpp's scales from its original weights (and ``importance``, if given), fixed
    while GPTQ updates the weights: :meth:`round` maps one column to the nearest code of its block's grid."""

    block = BLOCK

    def __init__(self, matrix: torch.Tensor, kind: BlockType, importance: torch.Tensor | None = None) -> None:
        reference = round_to_nearest(matrix, kind, importance)
        self.type = kind
        self.scale, self.minimum = reference.scale, reference.minimum
        self._step = reference.scale.float()
        self._inverse = _inverse(self._step)
        self._low = reference.minimum.float() if reference.minimum is not None else None

    def round(self, column: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, values)`` of one input column (all rows) in block ``group``, as :func:`dequantize`
        computes them."""
        low = None if self._low is None else self._low[:, group]
        return self._nearest(column, self._step[:, group], self._inverse[:, group], low)

    def values(self, matrix: torch.Tensor) -> torch.Tensor:
        """Every weight of ``matrix`` (``[rows, in]``) rounded to the nearest value of its block's grid."""
        blocks = matrix.float().reshape(matrix.shape[0], -1, self.block)
        low = None if self._low is None else self._low[..., None]
        return self._nearest(blocks, self._step[..., None], self._inverse[..., None], low)[1].reshape(matrix.shape)

    def _nearest(
        self, weights: torch.Tensor, step: torch.Tensor, inverse: torch.Tensor, low: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        shifted = weights if low is None else weights - low
        codes = (torch.round(shifted * inverse) + self.type.offset).clamp_(self.type.lowest, self.type.highest)
        values = step * (codes - self.type.offset)
        return codes, values if low is None else values + low

    def record(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> BlockWeights:
        """The record of GPTQ's chosen ``codes`` (``[rows, in]``, plain column order), keeping only ``rows``
        if given."""
        import torch

        pick = slice(None) if rows is None else rows
        minimum = None if self.minimum is None else self.minimum[pick]
        return BlockWeights(codes[pick].to(torch.int8), self.scale[pick], minimum, self.type)


def pack(record: BlockWeights) -> np.ndarray:
    """The type's blocks, ``[out, in / 32 * bytes per block]`` uint8, as ``ggml`` lays them out:
    fp16 ``d`` (and ``m``), then for 5-bit types the 32 fifth bits as a little-endian uint32, then the
    codes (Q8_0: one signed byte each; 4/5-bit: the low nibbles of codes ``j`` and ``j + 16`` in one byte)."""
    import numpy as np

    rows = record.codes.shape[0]
    codes = record.codes.cpu().numpy().reshape(rows, -1, BLOCK)
    parts = [record.scale.cpu().numpy().astype(np.float16)[..., None].view(np.uint8)]
    if record.minimum is not None:
        parts.append(record.minimum.cpu().numpy().astype(np.float16)[..., None].view(np.uint8))
    if record.type.bits == 8:
        parts.append(codes.astype(np.int8).view(np.uint8))
    else:
        levels = codes.astype(np.uint8)
        if record.type.bits == 5:
            parts.append(np.packbits(levels >> 4, axis=-1, bitorder="little"))
        parts.append((levels[..., :16] & 0x0F) | ((levels[..., 16:] & 0x0F) << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
