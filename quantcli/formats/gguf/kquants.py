"""llama.cpp's K-quants Q3_K, Q4_K, Q5_K and Q6_K as grids quantcli's methods can round onto.

Each row is cut into super-blocks of 256 inputs, each into sub-blocks with their own scale:

- Q3_K: 16 sub-blocks of 16; codes -4..3; a weight is ``d·sc·q`` with a signed 6-bit ``sc`` per sub-block
  and an fp16 ``d`` per super-block (110 bytes, 3.4375 bits/weight).
- Q4_K, Q5_K: 8 sub-blocks of 32; codes 0..15 (0..31); a weight is ``d·sc·q - dmin·m`` with 6-bit ``sc``
  and ``m`` per sub-block and fp16 ``d``, ``dmin`` per super-block (144 and 176 bytes, 4.5 and 5.5 bits/weight).
- Q6_K: 16 sub-blocks of 16; codes -32..31; a weight is ``d·sc·q`` with an int8 ``sc`` per sub-block and an
  fp16 ``d`` per super-block (210 bytes, 6.5625 bits/weight).

:func:`round_to_nearest` is llama.cpp's quantizer: without an importance vector its reference one
(``quantize_row_qN_K_ref``, what ``llama_model_quantize`` runs without an imatrix), with one its imatrix
quantizer (``quantize_row_qN_K_impl``), each sub-block's scale (and minimum) from a search
(:mod:`quantcli.formats.gguf.scale_search`), then the sub-block scales quantized against the super-block,
then the codes rounded on the stored grid; tested byte for byte against ``libggml``'s own functions.
:class:`KGrid` keeps those scales and lets GPTQ choose the codes; the records, their values and their
blocks are :mod:`quantcli.formats.gguf.kquant_layout`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantcli.formats.gguf import scale_search as search
from quantcli.formats.gguf.kquant_layout import SUPER, KWeights, dequantize, pack, steps
from quantcli.formats.gguf.legacy import FixedGrid

if TYPE_CHECKING:
    import torch

__all__ = ["K_TYPES", "SUPER", "KGrid", "KType", "KWeights", "dequantize", "pack", "round_to_nearest"]
CHUNK = 2**20  # weights rounded at once


@dataclass(frozen=True)
class KType:
    """One K-quant: ``bits`` per code, codes ``lowest..highest``, ``sub`` inputs per sub-block, whether
    sub-blocks carry a minimum (Q4_K, Q5_K) or codes are signed around 0 (Q3_K, Q6_K), and for the types with
    a minimum the reference search's ``candidates`` (``rmin``, ``rdelta``, ``steps``)."""

    name: str
    bits: int
    sub: int
    lowest: int
    highest: int
    has_min: bool
    candidates: tuple[float, float, int] = (0.0, 0.0, 0)
    offset: int = 0
    block: int = SUPER  # inputs per stored block: the width must be a multiple of it

    def round(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> KWeights:
        return round_to_nearest(matrix, self, importance)

    def grid(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> KGrid:
        return KGrid(matrix, self, importance)


K_TYPES = {
    "Q3_K": KType("Q3_K", 3, 16, -4, 3, False),
    "Q4_K": KType("Q4_K", 4, 32, 0, 15, True, (-1.0, 0.1, 20)),
    "Q5_K": KType("Q5_K", 5, 32, 0, 31, True, (-0.5, 0.1, 15)),
    "Q6_K": KType("Q6_K", 6, 16, -32, 31, False),
}
IMPORTANCE_SEARCH = (-0.9, 0.05, 36)  # make_qkx3_quants' candidates in every imatrix quantizer with a minimum


def _as_byte(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` stored in a ``uint8`` (modulo 256, as C converts)."""
    return search.nearest(values).long() & 0xFF


def round_to_nearest(matrix: torch.Tensor, kind: KType, importance: torch.Tensor | None = None) -> KWeights:
    """llama.cpp's quantization of ``matrix`` (``[out, in]``, ``in`` a multiple of 256) onto ``kind``, its
    imatrix quantizer when ``importance`` (``[in]``, e.g. each input's mean square) is given; in chunks of
    rows (a search holds a dozen float32 copies of what it works on)."""
    import torch

    step = max(1, CHUNK // matrix.shape[1])
    if matrix.shape[0] <= step:
        return _round_rows(matrix, kind, importance)
    parts = [_round_rows(matrix[first : first + step], kind, importance) for first in range(0, len(matrix), step)]
    joined = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return KWeights(*(joined(name) for name in ("codes", "scales", "mins", "d", "dmin")), kind)


def _weights(x: torch.Tensor, importance: torch.Tensor, kind: KType) -> torch.Tensor:
    """The imatrix quantizers' ``qw·sqrtf(sigma2 + x²)``, ``sigma2`` twice the super-block's mean square;
    ``x`` ``[rows, in]``, returned per sub-block ``[rows · in / sub, sub]``."""
    rows = x.shape[0]
    supers = x.reshape(rows, -1, SUPER)
    sigma2 = search.div(2 * search.total(supers * supers), SUPER)
    sigma2 = sigma2.repeat_interleave(SUPER // kind.sub, 1)
    weights = search.importance_weights(
        supers.reshape(rows, -1, kind.sub), importance.float().reshape(-1, kind.sub), sigma2
    )
    return weights.reshape(-1, kind.sub)


def _round_rows(matrix: torch.Tensor, kind: KType, importance: torch.Tensor | None) -> KWeights:
    import torch

    rows, width = matrix.shape
    per = SUPER // kind.sub
    x = matrix.detach().float().reshape(-1, kind.sub)
    weights = None if importance is None else _weights(matrix.detach().float(), importance.to(x.device), kind)
    mins = dmin = None
    if kind.has_min:
        scale, minimum, codes = _sub_blocks_with_min(x, weights, kind)
        scale, minimum = scale.reshape(rows, -1, per), minimum.reshape(rows, -1, per)
        if weights is None:  # quantize_row_q4_K_ref / q5_K_ref: against each super-block's largest
            positive = lambda t: torch.where(t > 0, t, torch.zeros_like(t))  # noqa: E731  # C's "max = 0; if (v > max)": +0
            top_scale, top_min = positive(scale.amax(dim=-1)), positive(minimum.amax(dim=-1))
            inv_scale = torch.where(top_scale > 0, search.div(63, top_scale), torch.zeros_like(top_scale))
            inv_min = torch.where(top_min > 0, search.div(63, top_min), torch.zeros_like(top_min))
            scales = torch.clamp(_as_byte(inv_scale[..., None] * scale), max=63)
            mins = torch.clamp(_as_byte(inv_min[..., None] * minimum), max=63)
            d, dmin = search.div(top_scale, 63).half(), search.div(top_min, 63).half()
        else:  # quantize_row_q4_K_impl / q5_K_impl: make_qp_quants weighted by each sub-block's total weight
            total = search.total(weights).reshape(-1, per)
            d, scales = search.positive(scale.reshape(-1, per), 63, total)
            dmin, mins = search.positive(minimum.reshape(-1, per), 63, total)
            d, dmin = d.reshape(rows, -1).half(), dmin.reshape(rows, -1).half()
            scales, mins = (torch.clamp(t.long() & 0xFF, max=63).reshape(rows, -1, per) for t in (scales, mins))
    elif kind.name == "Q3_K":
        codes, scales, d = _q3_k(x, weights, rows, per)
    else:
        codes, scales, d = _q6_k(x, None if importance is None else _plain(importance, x, rows), rows, per)
    as_stored = lambda t: None if t is None else t.reshape(rows, -1).to(torch.int16)  # noqa: E731
    record = KWeights(codes, as_stored(scales), as_stored(mins), d, dmin, kind)
    step, offset = steps(record)
    step, shifted = step.reshape(-1, 1), x if offset is None else x + offset.reshape(-1, 1)
    requantized = torch.clamp(
        search.nearest(search.div(shifted, torch.where(step == 0, torch.ones_like(step), step))),
        kind.lowest,
        kind.highest,
    )
    record.codes = torch.where(step == 0, codes, requantized).reshape(rows, width).to(torch.int8)
    return record


def _q6_k(
    x: torch.Tensor, weights: torch.Tensor | None, rows: int, per: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_row_q6_K_ref``/``_impl`` (``make_qx_quants`` weighted by ``x²`` or by the imatrix itself),
    the scales against the super-block's largest: codes, stored scales and ``d``."""
    import torch

    scale, codes = search.signed(x, 32, weights)
    scale = scale.reshape(rows, -1, per)
    top_scale = torch.gather(scale, -1, scale.abs().argmax(dim=-1, keepdim=True))[..., 0]
    empty = top_scale.abs() < search.GROUP_MAX_EPS
    inverse = search.div(-128, torch.where(empty, torch.ones_like(top_scale), top_scale))
    d = torch.where(empty, torch.zeros_like(inverse), search.div(1, inverse)).half()
    scales = torch.clamp(search.nearest(inverse[..., None] * scale), max=127).long()
    scales = torch.where(empty[..., None], torch.zeros_like(scales), scales)
    codes = torch.where(empty.repeat_interleave(per, dim=-1).reshape(-1, 1), torch.full_like(codes, -32), codes)
    return codes, scales, d


def _plain(importance: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The importance vector per sub-block of every row, ``[rows · in / 16, 16]``."""
    return importance.float().to(x.device).reshape(1, -1, 16).expand(rows, -1, -1).reshape(-1, 16)


def _sub_blocks_with_min(
    x: torch.Tensor, weights: torch.Tensor | None, kind: KType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sub-block's scale, minimum and codes: ``make_qkx2_quants`` weighted by ``sqrtf(mean x²) + |x|``
    (reference) or ``make_qkx3_quants`` by the imatrix weights."""
    if weights is None:
        spread = search.sqrt(search.div(search.total(x * x), kind.sub))
        return search.with_min(x, spread[:, None] + x.abs(), kind.highest, *kind.candidates)
    return search.with_min(x, weights, kind.highest, *IMPORTANCE_SEARCH)


def _q3_k(
    x: torch.Tensor, weights: torch.Tensor | None, rows: int, per: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_row_q3_K_ref`` (``make_q3_quants``, the scales against the super-block's largest) or
    ``_impl`` (``make_qx_quants`` weighted, the scales by ``make_qx_quants`` weighted by each sub-block's
    total weight): codes, stored scales (signed) and ``d``."""
    import torch

    if weights is None:
        scale, codes = search.signed_refined(x, 4)
        scale = scale.reshape(rows, -1, per)
        top_scale = torch.gather(scale, -1, scale.abs().argmax(dim=-1, keepdim=True))[..., 0]
        empty = top_scale == 0
        inverse = search.div(-32, torch.where(empty, torch.ones_like(top_scale), top_scale))
        scales = torch.clamp(search.nearest(inverse[..., None] * scale), -32, 31).long()
        scales = torch.where(empty[..., None], torch.full_like(scales, -32), scales)
        d = torch.where(empty, torch.zeros_like(inverse), search.div(1, inverse)).half()
        return codes, scales, d
    scale, codes = search.signed(x, 4, weights)
    d, scales = search.signed(scale.reshape(-1, per), 32, search.total(weights).reshape(-1, per))
    return codes, scales.long().reshape(rows, -1, per), d.reshape(rows, -1).half()


class KGrid(FixedGrid):
    """A layer's K-quant grid with llama.cpp's scales from its original weights (and ``importance``, if
    given), fixed while GPTQ updates the weights (see :class:`quantcli.formats.gguf.legacy.FixedGrid`)."""

    def __init__(self, matrix: torch.Tensor, kind: KType, importance: torch.Tensor | None = None) -> None:
        import torch

        self.reference = round_to_nearest(matrix, kind, importance)
        self.type, self.block = kind, kind.sub
        self._step, offset = steps(self.reference)
        self._inverse = torch.where(self._step == 0, torch.zeros_like(self._step), 1 / self._step)
        self._low = None if offset is None else -offset

    def record(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> KWeights:
        import torch

        pick = slice(None) if rows is None else rows
        ref = self.reference
        keep = lambda t: None if t is None else t[pick]  # noqa: E731
        return KWeights(
            codes[pick].to(torch.int8), ref.scales[pick], keep(ref.mins), ref.d[pick], keep(ref.dmin), ref.type
        )
