"""llama.cpp's K-quants Q4_K and Q6_K as grids quantcli's methods can round onto.

Each row is cut into super-blocks of 256 inputs, each into sub-blocks with their own scale:

- Q4_K: 8 sub-blocks of 32; codes 0..15; a sub-block's weight is ``d·sc·q - dmin·m`` with 6-bit
  ``sc`` and ``m`` per sub-block and fp16 ``d``, ``dmin`` per super-block (144 bytes, 4.5 bits/weight).
- Q6_K: 16 sub-blocks of 16; codes -32..31; a weight is ``d·sc·q`` with an int8 ``sc`` per
  sub-block and an fp16 ``d`` per super-block (210 bytes, 6.5625 bits/weight).

:func:`round_to_nearest` is llama.cpp's reference quantizer (``quantize_row_q4_K_ref`` and
``quantize_row_q6_K_ref`` in ``ggml-quants.c``, what ``llama_model_quantize`` runs without an
imatrix): each sub-block's scale and minimum from a weighted least-squares search over 21 (Q4_K,
``make_qkx2_quants``) or 19 (Q6_K, ``make_qx_quants``) candidate scales, then the sub-block scales
quantized to 6 or 8 bits against the super-block's largest, then the codes rounded on the stored
grid. It is written out in float32 operations in llama.cpp's order (its sums are sequential), so
that its bytes can be llama.cpp's: tested against ``libggml``'s own function. :class:`KGrid` keeps
those scales and lets GPTQ choose the codes; :func:`pack` lays them out as ``ggml``'s blocks
(tested against ``gguf``'s dequantizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantcli.formats.gguf.legacy import FixedGrid

if TYPE_CHECKING:
    import numpy as np
    import torch

SUPER = 256  # inputs per super-block (ggml's QK_K)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a Q6_K sub-block below this magnitude is all zero
CHUNK = 2**20  # weights rounded at once


@dataclass(frozen=True)
class KType:
    """One K-quant: ``bits`` per code, codes ``lowest..highest``, ``sub`` inputs per sub-block and
    whether sub-blocks carry a minimum (Q4_K) or codes are signed around 0 (Q6_K)."""

    name: str
    bits: int
    sub: int
    lowest: int
    highest: int
    has_min: bool
    offset: int = 0
    block: int = SUPER  # inputs per stored block: the width must be a multiple of it

    def round(self, matrix: torch.Tensor) -> KWeights:
        return round_to_nearest(matrix, self)

    def grid(self, matrix: torch.Tensor) -> KGrid:
        return KGrid(matrix, self)


K_TYPES = {
    "Q4_K": KType("Q4_K", 4, 32, 0, 15, True),
    "Q6_K": KType("Q6_K", 6, 16, -32, 31, False),
}


@dataclass
class KWeights:
    """A layer on a K-quant grid: ``codes`` (int8 ``[out, in]``), the sub-block ``scales`` (and
    Q4_K's ``mins``) as stored (int16 ``[out, in / sub]``), fp16 ``d`` (and ``dmin``) per super-block."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None
    type: KType

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def pack(self) -> np.ndarray:
        return pack(self)


def _sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over the last axis in float32, one element after the other, as a C loop adds."""
    total = values[..., 0].clone()
    for i in range(1, values.shape[-1]):
        total = total + values[..., i]
    return total


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` in float32 as C divides: both operands full tensors of one shape (torch divides by a
    scalar, or a scalar by a tensor, through a reciprocal, which rounds twice)."""
    import torch

    a, b = torch.broadcast_tensors(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32))
    return torch.div(a.contiguous(), b.contiguous())


def _nearest(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even (its 1.5·2^23 trick)."""
    return values.round()


def _search_with_min(
    x: torch.Tensor, weights: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants(n, top, x, weights, ..., rmin=-1, rdelta=0.1, nstep=20, use_mad=false)`` on
    every row of ``x`` (``[N, n]``): scale, minimum (as stored: positive, subtracted) and codes."""
    import torch

    low = torch.clamp(x.amin(dim=1), max=0.0)
    high = x.amax(dim=1)
    sum_w, sum_x = _sum(weights), _sum(weights * x)
    flat = high == low
    inverse = _div(top, torch.where(flat, torch.ones_like(high), high - low))
    scale = _div(1, inverse)
    codes = torch.clamp(_nearest(inverse[:, None] * (x - low[:, None])), 0, top)
    error = scale[:, None] * codes + low[:, None] - x
    best = _sum(weights * (error * error))
    for step in range(21):  # each candidate from the minimum found so far, as llama.cpp's loop updates it
        inverse = _div(
            torch.tensor(-1.0) + torch.tensor(0.1) * step + top, torch.where(flat, torch.ones_like(high), high - low)
        )
        trial = torch.clamp(_nearest(inverse[:, None] * (x - low[:, None])), 0, top)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * trial), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = _div(sum_w * sum_xl - sum_x * sum_l, det)
        trial_min = _div(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = trial_min > 0
        trial_min = torch.where(positive, torch.zeros_like(trial_min), trial_min)
        trial_scale = torch.where(positive, _div(sum_xl, sum_l2), trial_scale)
        error = trial_scale[:, None] * trial + trial_min[:, None] - x
        error = _sum(weights * (error * error))
        better = (det > 0) & (error < best) & ~flat
        codes = torch.where(better[:, None], trial, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, trial_scale, scale)
        low = torch.where(better, trial_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat[:, None], torch.zeros_like(codes), codes)
    return scale, -low, codes


def _search_signed(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, top, x, L, rmse_type=1, NULL)`` on every row of ``x``: scale and codes
    (signed, ``-top..top-1``), weights ``x²``, scales ``-(top + 0.1·k)/max`` for k in -9..9."""
    import torch

    first = x.abs().argmax(dim=1, keepdim=True)  # the first of equal magnitudes, as its strict ">" keeps
    signed_max = torch.gather(x, 1, first)[:, 0]
    zero = x.abs().amax(dim=1) < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    weights = x * x

    def trial(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = torch.clamp(_nearest(inverse[:, None] * x), -top, top - 1)
        return levels, _sum(weights * x * levels), _sum(weights * levels * levels)

    codes, sum_lx, sum_l2 = trial(_div(-top, signed_max))
    scale = torch.where(sum_l2 != 0, _div(sum_lx, sum_l2), torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        levels, sum_lx, sum_l2 = trial(_div(-(top + torch.tensor(0.1) * step), signed_max))
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        codes = torch.where(better[:, None], levels, codes)
        scale = torch.where(better, _div(sum_lx, sum_l2), scale)
        best = torch.where(better, scale * sum_lx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(
        zero[:, None], torch.full_like(codes, -top), codes
    )


def _as_byte(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` stored in a ``uint8`` (modulo 256, as C converts)."""
    return _nearest(values).long() & 0xFF


def round_to_nearest(matrix: torch.Tensor, kind: KType) -> KWeights:
    """llama.cpp's reference quantization of ``matrix`` (``[out, in]``, ``in`` a multiple of 256), in
    chunks of rows (its search holds a dozen float32 copies of what it works on)."""
    import torch

    step = max(1, CHUNK // matrix.shape[1])
    if matrix.shape[0] <= step:
        return _round_rows(matrix, kind)
    parts = [_round_rows(matrix[first : first + step], kind) for first in range(0, matrix.shape[0], step)]
    joined = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return KWeights(*(joined(name) for name in ("codes", "scales", "mins", "d", "dmin")), kind)


def _round_rows(matrix: torch.Tensor, kind: KType) -> KWeights:
    import torch

    rows, width = matrix.shape
    x = matrix.detach().float().reshape(-1, kind.sub)
    if kind.has_min:  # quantize_row_q4_K_ref
        spread = torch.sqrt(
            _div(_sum(x * x), kind.sub).double()
        ).float()  # correctly rounded, as sqrtf (torch's float32 sqrt is not)
        scale, minimum, codes = _search_with_min(x, spread[:, None] + x.abs(), kind.highest)
        scale, minimum = scale.reshape(rows, -1, SUPER // kind.sub), minimum.reshape(rows, -1, SUPER // kind.sub)
        top_scale, top_min = scale.amax(dim=-1).clamp(min=0), minimum.amax(dim=-1).clamp(min=0)
        inv_scale = torch.where(top_scale > 0, _div(63, top_scale), torch.zeros_like(top_scale))
        inv_min = torch.where(top_min > 0, _div(63, top_min), torch.zeros_like(top_min))
        scales = torch.clamp(_as_byte(inv_scale[..., None] * scale), max=63)
        mins = torch.clamp(_as_byte(inv_min[..., None] * minimum), max=63)
        d, dmin = _div(top_scale, 63).half(), _div(top_min, 63).half()
        step = (d.float()[..., None] * scales.float()).reshape(-1)
        offset = (dmin.float()[..., None] * mins.float()).reshape(-1)
        requantized = torch.clamp(
            _nearest(_div(x + offset[:, None], torch.where(step == 0, torch.ones_like(step), step)[:, None])), 0, 15
        )
    else:  # quantize_row_q6_K_ref
        scale, codes = _search_signed(x, 32)
        scale = scale.reshape(rows, -1, SUPER // kind.sub)
        first = scale.abs().argmax(dim=-1, keepdim=True)
        top_scale = torch.gather(scale, -1, first)[..., 0]
        empty = top_scale.abs() < GROUP_MAX_EPS
        inverse = _div(-128, torch.where(empty, torch.ones_like(top_scale), top_scale))
        d = torch.where(empty, torch.zeros_like(inverse), _div(1, inverse)).half()
        scales = torch.clamp(_nearest(inverse[..., None] * scale), max=127).long()
        scales = torch.where(empty[..., None], torch.zeros_like(scales), scales)
        codes = torch.where(
            empty.repeat_interleave(SUPER // kind.sub, dim=-1).reshape(-1, 1), torch.full_like(codes, -32), codes
        )
        mins = dmin = None
        step = (d.float()[..., None] * scales.float()).reshape(-1)
        requantized = torch.clamp(
            _nearest(_div(x, torch.where(step == 0, torch.ones_like(step), step)[:, None])), -32, 31
        )
    codes = torch.where((step == 0)[:, None], codes, requantized)
    as_stored = lambda t: None if t is None else t.reshape(rows, -1).to(torch.int16)  # noqa: E731
    return KWeights(codes.reshape(rows, width).to(torch.int8), as_stored(scales), as_stored(mins), d, dmin, kind)


def _steps(record: KWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sub-block's float32 step ``d·sc`` and subtracted minimum ``dmin·m``, ``[out, in / sub]``."""
    per = SUPER // record.type.sub
    step = record.d.float().repeat_interleave(per, dim=1) * record.scales.float()
    offset = None if record.mins is None else record.dmin.float().repeat_interleave(per, dim=1) * record.mins.float()
    return step, offset


def dequantize(record: KWeights) -> torch.Tensor:
    """The fp32 ``[out, in]`` values llama.cpp computes with (``gguf``'s dequantizer's arithmetic)."""
    rows, sub = record.codes.shape[0], record.type.sub
    step, offset = _steps(record)
    values = step[..., None] * record.codes.float().reshape(rows, -1, sub)
    if offset is not None:
        values = values - offset[..., None]
    return values.reshape(record.codes.shape)


class KGrid(FixedGrid):
    """A layer's K-quant grid with llama.cpp's reference scales from its original weights, fixed
    while GPTQ updates the weights (see :class:`quantcli.formats.gguf.types.FixedGrid`)."""

    def __init__(self, matrix: torch.Tensor, kind: KType) -> None:
        import torch

        self.reference = round_to_nearest(matrix, kind)
        self.type, self.block = kind, kind.sub
        self._step, offset = _steps(self.reference)
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


def pack(record: KWeights) -> np.ndarray:
    """The type's super-blocks, ``[out, in / 256 * bytes per block]`` uint8, as ``ggml`` lays them out.
    Q4_K: fp16 ``d``, ``dmin``, 12 bytes of 6-bit scales and minimums (the low 6 bits of sub-blocks
    0-3 in bytes 0-7, the high 2 bits of sub-blocks 4-7 on top of them, their low 4 bits in bytes
    8-11), 128 bytes of codes (each 64 inputs: the low nibbles the first 32, the high nibbles the next).
    Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 ``d``."""
    import numpy as np

    rows = record.codes.shape[0]
    per = SUPER // record.type.sub
    d = record.d.cpu().numpy().astype(np.float16).reshape(rows, -1, 1).view(np.uint8)
    scales = record.scales.cpu().numpy().reshape(rows, -1, per)
    if record.type.has_min:
        codes = record.codes.cpu().numpy().astype(np.uint8).reshape(rows, -1, 4, 2, 32)
        sc, m = scales.astype(np.uint8), record.mins.cpu().numpy().astype(np.uint8).reshape(rows, -1, per)
        packed_scales = np.concatenate(
            [
                (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
                (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
            ],
            axis=-1,
        )
        quads = (codes[..., 0, :] | (codes[..., 1, :] << 4)).reshape(rows, -1, 128)
        dmin = record.dmin.cpu().numpy().astype(np.float16).reshape(rows, -1, 1).view(np.uint8)
        parts = [d, dmin, packed_scales, quads]
    else:
        levels = (record.codes.cpu().numpy().astype(np.int16) + 32).astype(np.uint8).reshape(rows, -1, 2, 4, 32)
        low = levels & 15
        ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], axis=-1)
        high = levels >> 4
        qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), scales.astype(np.int8).view(np.uint8), d]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
