"""llama.cpp's scale searches (``ggml-quants.c``), each run on every row of ``x`` (``[N, n]``) at once.

The K-quants' reference quantizers and, with an importance vector (llama.cpp's imatrix; GPTQ's
``diag(H)``), every ``quantize_*_impl`` choose a block's scale with one of these:
``make_qx_quants`` (:func:`signed`), ``make_q3_quants`` (:func:`signed_refined`),
``make_qkx2_quants``/``make_qkx3_quants`` (:func:`with_min`) and ``make_qp_quants`` (:func:`positive`).
They are written in float32 operations in llama.cpp's order (its sums are sequential; divisions and square
roots round once, as C's do) so that the bytes they lead to are llama.cpp's: tested against ``libggml``.
A loop that llama.cpp leaves early once nothing changes runs its full count here: a pass that changes
nothing leaves the state as it was, so the result is the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group below this magnitude is all zero


def total(values: torch.Tensor) -> torch.Tensor:
    """The sum over the last axis in float32, one element after the other, as a C loop adds."""
    result = values[..., 0].clone()
    for i in range(1, values.shape[-1]):
        result = result + values[..., i]
    return result


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` in float32 as C divides: both operands full tensors of one shape (torch divides by a
    scalar, or a scalar by a tensor, through a reciprocal, which rounds twice)."""
    import torch

    a, b = torch.broadcast_tensors(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32))
    return torch.div(a.contiguous(), b.contiguous())


def sqrt(values: torch.Tensor) -> torch.Tensor:
    """``sqrtf``, correctly rounded (torch's float32 square root is not)."""
    import torch

    return torch.sqrt(values.double()).float()


def nearest(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even (its 1.5·2^23 trick)."""
    return values.round()


def _f32(value: float) -> torch.Tensor:
    import torch

    return torch.tensor(value, dtype=torch.float32)


def importance_weights(x: torch.Tensor, importance: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[i]·sqrtf(sigma2 + x[i]²)``, the weights every ``quantize_*_impl`` gives its search: ``x``
    ``[rows, blocks, n]``, ``importance`` ``[blocks, n]``, ``sigma2`` ``[rows, blocks or 1]``."""
    return importance * sqrt(sigma2[..., None] + x * x)


def with_min(
    x: torch.Tensor, weights: torch.Tensor, top: int, rmin: float, rdelta: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``/``make_qkx3_quants(n, top, x, weights, ..., rmin, rdelta, steps, use_mad=false)``:
    scale, minimum (as stored: positive, subtracted) and codes ``0..top``."""
    import torch

    low = torch.clamp(x.amin(dim=1), max=0.0)
    high = x.amax(dim=1)
    sum_w, sum_x = total(weights), total(weights * x)
    flat = high == low
    inverse = div(top, torch.where(flat, torch.ones_like(high), high - low))
    scale = div(1, inverse)
    codes = torch.clamp(nearest(inverse[:, None] * (x - low[:, None])), 0, top)
    error = scale[:, None] * codes + low[:, None] - x
    best = total(weights * (error * error))
    for step in range(steps + 1):  # each candidate from the minimum found so far, as llama.cpp's loop updates it
        inverse = div(_f32(rmin) + _f32(rdelta) * step + top, torch.where(flat, torch.ones_like(high), high - low))
        trial = torch.clamp(nearest(inverse[:, None] * (x - low[:, None])), 0, top)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = total(wl), total(wl * trial), total(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = div(sum_w * sum_xl - sum_x * sum_l, det)
        trial_min = div(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive_min = trial_min > 0
        trial_min = torch.where(positive_min, torch.zeros_like(trial_min), trial_min)
        trial_scale = torch.where(positive_min, div(sum_xl, sum_l2), trial_scale)
        error = trial_scale[:, None] * trial + trial_min[:, None] - x
        error = total(weights * (error * error))
        better = (det > 0) & (error < best) & ~flat
        codes = torch.where(better[:, None], trial, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, trial_scale, scale)
        low = torch.where(better, trial_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat[:, None], torch.zeros_like(codes), codes)
    return scale, -low, codes


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The value of largest magnitude (the first of equal ones, as a strict ``>`` keeps) and whether the group
    is all zero; an all-zero group's maximum is 1 (its result is discarded)."""
    import torch

    first = x.abs().argmax(dim=1, keepdim=True)
    signed_max = torch.gather(x, 1, first)[:, 0]
    zero = x.abs().amax(dim=1) < GROUP_MAX_EPS
    return torch.where(zero, torch.ones_like(signed_max), signed_max), zero


def signed(x: torch.Tensor, top: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, top, x, L, rmse_type=1, weights)``: scale and signed codes ``-top..top-1``
    (an all-zero group: scale 0, codes ``-top``); ``weights`` None: ``x²``. Scales ``-(top + 0.1·k)/max``
    for k in -9..9."""
    import torch

    signed_max, zero = _signed_max(x)
    weights = x * x if weights is None else weights

    def trial(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = torch.clamp(nearest(inverse[:, None] * x), -top, top - 1)
        return levels, total(weights * x * levels), total(weights * levels * levels)

    codes, sum_lx, sum_l2 = trial(div(-top, signed_max))
    scale = torch.where(sum_l2 != 0, div(sum_lx, sum_l2), torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        levels, sum_lx, sum_l2 = trial(div(-(top + _f32(0.1) * step), signed_max))
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        codes = torch.where(better[:, None], levels, codes)
        scale = torch.where(better, div(sum_lx, sum_l2), scale)
        best = torch.where(better, scale * sum_lx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(
        zero[:, None], torch.full_like(codes, -top), codes
    )


def signed_refined(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, top, x, L, do_rmse=true)``: codes rounded at ``-top/max``, then up to 5 passes
    that move each code, in order, to where it lowers the ``x²``-weighted error; scale and signed codes."""
    import torch

    signed_max, zero = _signed_max(x)
    weights = x * x
    codes = torch.clamp(nearest(div(-top, signed_max)[:, None] * x), -top, top - 1)
    sum_lx, sum_l2 = total(weights * x * codes), total(weights * codes * codes)
    for _ in range(5):
        for i in range(x.shape[1]):
            w, xi, li = weights[:, i], x[:, i], codes[:, i]
            slx = sum_lx - w * xi * li
            sl2 = sum_l2 - w * li * li
            moved = torch.clamp(nearest(div(xi * sl2, torch.where(slx > 0, slx, torch.ones_like(slx)))), -top, top - 1)
            new_lx, new_l2 = slx + w * xi * moved, sl2 + w * moved * moved
            take = (slx > 0) & (moved != li) & (new_l2 > 0) & (new_lx * new_lx * sum_l2 > sum_lx * sum_lx * new_l2)
            codes[:, i] = torch.where(take, moved, li)
            sum_lx, sum_l2 = torch.where(take, new_lx, sum_lx), torch.where(take, new_l2, sum_l2)
    scale = torch.where(sum_l2 > 0, div(sum_lx, torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))), 0.0)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(
        zero[:, None], torch.full_like(codes, -top), codes
    )


def positive(x: torch.Tensor, top: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, top, x, L, weights)`` (the K-quants' sub-block scales and minimums under an
    imatrix): the best of the scales ``max/(top + 0.1·k)``, k in -4..4, by weighted error, then up to 5
    passes moving each code; scale and codes ``..top``."""
    import torch

    high = torch.clamp(x.amax(dim=1), min=0.0)
    zero = high < GROUP_MAX_EPS
    high = torch.where(zero, torch.ones_like(high), high)
    inverse = div(top, high)
    levels = nearest(inverse[:, None] * x)
    error = x - div(1, inverse)[:, None] * levels
    best = total(weights * error * error)
    for step in (*range(-4, 0), *range(1, 5)):
        trial_inverse = div(_f32(0.1) * step + top, high)
        levels = torch.clamp(nearest(trial_inverse[:, None] * x), max=top)
        error = x - div(1, trial_inverse)[:, None] * levels
        error = total(weights * error * error)
        better = error < best
        best, inverse = torch.where(better, error, best), torch.where(better, trial_inverse, inverse)
    codes = torch.clamp(nearest(inverse[:, None] * x), max=top)
    sum_lx, sum_l2 = total(weights * x * codes), total(weights * codes * codes)
    for _ in range(5):
        for i in range(x.shape[1]):
            w, xi, li = weights[:, i], x[:, i], codes[:, i]
            slx = sum_lx - w * xi * li
            sl2 = sum_l2 - w * li * li
            usable = (slx > 0) & (sl2 > 0)
            moved = torch.clamp(nearest(div(xi * sl2, torch.where(usable, slx, torch.ones_like(slx)))), max=top)
            new_lx, new_l2 = slx + w * xi * moved, sl2 + w * moved * moved
            take = usable & (moved != li) & (new_lx * new_lx * sum_l2 > sum_lx * sum_lx * new_l2)
            codes[:, i] = torch.where(take, moved, li)
            sum_lx, sum_l2 = torch.where(take, new_lx, sum_lx), torch.where(take, new_l2, sum_l2)
    scale = torch.where(sum_l2 > 0, div(sum_lx, torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))), 0.0)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], torch.zeros_like(codes), codes)
