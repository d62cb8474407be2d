"""Pure-PyTorch reference quantization ops: the fallback everywhere and the tests' oracle.

Conventions follow compressed-tensors (the format vLLM serves): integers are signed,
``[-2**(bits-1), 2**(bits-1) - 1]``; ``q = clamp(round(w / scale) + zero_point)``;
``w ≈ (q - zero_point) * scale``. Weights are 2-D ``[out_features, in_features]`` and
groups run along the input dimension; ``group_size=None`` means one group per output channel.
"""

from __future__ import annotations

import torch


def int_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed integer representable in ``bits`` bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, groups, group_size]``."""
    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    if in_features % size:
        raise ValueError(f"group size {size} does not divide in_features {in_features}")
    return weight.reshape(out_features, in_features // size, size)


OBSERVERS = ("minmax", "mse", "signed")


def _qparams_from_range(
    low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = int_range(bits)
    if symmetric:
        scale = torch.maximum(low.abs(), high) / ((qmax - qmin) / 2)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    scale = (high - low) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.clamp(qmin - torch.round(low / scale), qmin, qmax).to(torch.int8)


def _mse_range(
    groups: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink each group's range by the factor (1, 0.99, ... 0.21) that minimises ``sum |w - ŵ|^2.4``:
    clipping a few outliers buys finer steps for the rest (the GPTQ reference code's MSE grid)."""
    qmin, qmax = int_range(bits)
    best_error = torch.full_like(low, float("inf"))
    best_low, best_high = low.clone(), high.clone()
    for step in range(int(max_shrink * grid)):
        shrink = 1 - step / grid
        scale, zero_point = _qparams_from_range(low * shrink, high * shrink, bits, symmetric)
        scale = _stored(scale, scale_dtype).float()
        q = torch.clamp(torch.round(groups / scale.unsqueeze(-1) + zero_point.unsqueeze(-1)), qmin, qmax)
        error = ((q - zero_point.unsqueeze(-1)) * scale.unsqueeze(-1) - groups).abs().pow(norm).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_low = torch.where(better, low * shrink, best_low)
        best_high = torch.where(better, high * shrink, best_high)
    return best_low, best_high


def compute_qparams(
    weight: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    observer: str = "minmax",
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group: shapes ``[out, groups]`` (scale in weight dtype, zp int8).

    ``observer="minmax"`` spans each group's full range (symmetric: ``absmax / (2**bits / 2 - 0.5)``,
    absmax/7.5 at 4 bits, so a positive maximum rounds to 8 and is clipped to 7); ``"mse"`` searches a
    clipped range; ``"signed"`` (symmetric only) is llama.cpp's Q4_0/Q8_0 rule: the group's
    largest-magnitude weight lands exactly on code ``-2**(bits-1)`` (-8 at 4 bits), so all ``2**bits``
    codes are used and the scale is negative when that weight is positive.

    Scales are rounded to ``scale_dtype`` (the dtype the checkpoint stores them in; default the
    weight's) before any integer is chosen, so the integers are the best ones for the stored scales.
    """
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    scale_dtype = scale_dtype or weight.dtype
    groups = _grouped(weight.float(), group_size)
    if observer == "signed":
        scale, zero_point = _signed_scale(groups, bits, symmetric)
    else:
        low = groups.amin(dim=-1).clamp(max=0)
        high = groups.amax(dim=-1).clamp(min=0)
        if observer == "mse":
            low, high = _mse_range(groups, low, high, bits, symmetric, scale_dtype)
        scale, zero_point = _qparams_from_range(low, high, bits, symmetric)
    return _stored(scale, scale_dtype).to(weight.dtype), zero_point


def _stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype``; a scale that rounds to zero (fp16 below 6e-8) becomes 1, as an
    all-zero group's does, so no integer is ever divided by zero."""
    rounded = scale.to(dtype)
    return torch.where(rounded == 0, torch.ones_like(rounded), rounded)


def _signed_scale(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's scale ``-w_max / 2**(bits-1)``, ``w_max`` the signed weight of largest magnitude."""
    if not symmetric:
        raise ValueError("the signed observer is symmetric only (it puts the largest weight on the lowest code)")
    index = groups.abs().argmax(dim=-1, keepdim=True)
    scale = -groups.gather(-1, index).squeeze(-1) / 2 ** (bits - 1)
    return scale, torch.zeros_like(scale, dtype=torch.int8)


def quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Integers (int8 tensor, same shape as ``weight``) for the given per-group parameters."""
    groups = _grouped(weight.float(), group_size)
    qmin, qmax = int_range(bits)
    scaled = groups / scale.float().unsqueeze(-1) + zero_point.float().unsqueeze(-1)
    return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8).reshape(weight.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale``, in the scale's dtype."""
    groups = _grouped(q.float(), group_size)
    values = (groups - zero_point.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return values.reshape(q.shape).to(scale.dtype)


def fake_quantize(
    weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, observer: str = "minmax"
) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize: what an RTN layer computes with."""
    scale, zero_point = compute_qparams(weight, bits, symmetric, group_size, observer)
    return dequantize(quantize(weight, scale, zero_point, bits, group_size), scale, zero_point, group_size)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit integers along the last dim into int32 words as one dense bit stream.

    Values are offset by ``2**(bits-1)`` to unsigned; value ``i`` of a row takes bits
    ``[i*bits, (i+1)*bits)`` of the row's stream, lowest first, zero-padded to whole words
    (compressed-tensors' ``pack-quantized`` layout, so 3-bit values may straddle two words).
    """
    unsigned = (q.to(torch.int64) + 2 ** (bits - 1)) & (2**bits - 1)
    stream = (unsigned.unsqueeze(-1) >> torch.arange(bits)) & 1
    stream = stream.reshape(*q.shape[:-1], -1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.shape[-1]) % 32))
    words = (stream.reshape(*q.shape[:-1], -1, 32) << torch.arange(32)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``length`` signed integers of each row, as int8."""
    stream = ((packed.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> torch.arange(32)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : length * bits]
    unsigned = (stream.reshape(*packed.shape[:-1], length, bits) << torch.arange(bits)).sum(dim=-1)
    return (unsigned - 2 ** (bits - 1)).to(torch.int8)


def quantize_to_codebook(values: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``codebook`` entry to ``values / scale`` (a non-uniform grid such as NF4)."""
    normalized = values.float() / scale.float()
    return (normalized.unsqueeze(-1) - codebook.float()).abs().argmin(dim=-1).to(torch.uint8)


def dequantize_codebook(indices: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[indices] * scale``."""
    return codebook.float()[indices.long()] * scale.float()
