"""Least-squares refit of a quantized layer's group scales once its integers are fixed (GPTQ's
``refit_scales``).

GPTQ chooses each row's integers for scales set before it runs (from the weights' ranges). With the
integers fixed, a row's dequantized weights ``ŵ_j = level_j · s_g(j)`` (``level = q - zero_point``, or the
codebook value of ``q``) are linear in its group scales ``s``, so the scales that minimise the layer's
output error on the calibration inputs, ``(w - ŵ) H (w - ŵ)ᵀ``, solve one small linear system per row,
``(Lᵀ H L) s = Lᵀ H w`` with ``L`` the ``[in, groups]`` matrix of the row's levels (one unknown per group,
coupled through ``H``). The solution is rounded to the scales' storage dtype and kept only for the rows
whose error it lowers, so no row gets worse. On an asymmetric grid each group's offset is solved with its
scale (``ŵ = q·s + m``), rounded to the integer zero point ``-m/s`` in the grid's range, and the scales
solved again for it.
"""

from __future__ import annotations

import torch

from quantcli.quant import ops

ROW_ELEMENTS = 2**24  # rows · in · groups per chunk of the system build (64 MiB fp32)


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Each row's ``e H eᵀ``: its share of ``||WX - ŴX||²`` (up to the constant in ``H``)."""
    return ((error @ hessian) * error).sum(dim=1)


def refit_scales(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    codebook: torch.Tensor | None,
    dtype: torch.dtype,
    bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The scales (``[rows, groups]``, in ``scale``'s dtype) minimising each row's output error for the fixed
    integers ``q`` (``[rows, in]``; levels ``q - zero_point``, or ``codebook[q]`` with a codebook, whose scales
    are stored in float32), rounded to ``dtype``; with ``bits`` (an asymmetric grid) the zero points refit too.
    Each row takes the refit only where that lowers its error. Returns scales, zero points and the rows changed."""
    rows, columns = q.shape
    groups = scale.shape[1]
    size = columns // groups
    matrix, hessian, old = weight.float(), hessian.float(), scale.float()
    if codebook is not None:
        levels, dtype = codebook.float()[q.long()], torch.float32
    else:
        levels = q.float() - zero_point.float().repeat_interleave(size, dim=1)
    zero = zero_point
    if bits is not None and codebook is None:  # scale and offset together, then the offset as an integer zero point
        grouped = q.float().reshape(rows, groups, size)
        start = torch.stack([old, -zero_point.float() * old], dim=-1)
        joint = _solve(matrix, hessian, torch.stack([grouped, torch.ones_like(grouped)], dim=-1), start)
        ratio = torch.nan_to_num(-joint[..., 1] / joint[..., 0], nan=0.0, posinf=0.0, neginf=0.0)
        zero = torch.round(ratio).clamp(*ops.int_range(bits)).to(zero_point.dtype)
    fitted_levels = q.float() - zero.float().repeat_interleave(size, dim=1) if zero is not zero_point else levels
    fitted = _solve(matrix, hessian, fitted_levels.reshape(rows, groups, size, 1), old[..., None])[..., 0]
    fitted = fitted.to(dtype).float()
    fitted = torch.where(torch.isfinite(fitted) & (fitted != 0), fitted, old)
    before = output_error(matrix - levels * old.repeat_interleave(size, dim=1), hessian)
    after = output_error(matrix - fitted_levels * fitted.repeat_interleave(size, dim=1), hessian)
    better = (after < before)[:, None]
    scales, zeros = torch.where(better, fitted, old).to(scale.dtype), torch.where(better, zero, zero_point)
    return scales.contiguous(), zeros.contiguous(), int(better.sum())


def _solve(matrix: torch.Tensor, hessian: torch.Tensor, features: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Per row, the coefficients ``c`` (``[rows, groups, k]``) minimising ``(w - ŵ) H (w - ŵ)ᵀ`` for
    ``ŵ_j = Σ_i features[g(j), j, i] · c[g(j), i]`` (``features``: ``[rows, groups, size, k]``, each supported
    on its group); a coefficient whose feature is all zero, or a row whose system is singular, keeps ``start``."""
    rows, groups, size, k = features.shape
    columns = groups * size
    blocks = hessian.reshape(columns, groups, size).permute(1, 0, 2)  # [groups, in, size]: H's columns by group
    per_chunk = max(1, ROW_ELEMENTS // (columns * groups * k))
    systems, targets = [], []
    for first in range(0, rows, per_chunk):
        chunk = features[first : first + per_chunk]
        count = len(chunk)
        # (H F)[r, j, h, i]: sum over group h's inputs b of H[j, b] · feature i of r at b
        hf = torch.bmm(blocks, chunk.permute(1, 2, 0, 3).reshape(groups, size, count * k))
        hf = hf.reshape(groups, columns, count, k).permute(2, 1, 0, 3).reshape(count, groups, size, groups, k)
        systems.append(torch.einsum("rgai,rgahj->rgihj", chunk, hf).reshape(count, groups * k, groups * k))
        wh = (matrix[first : first + per_chunk] @ hessian).reshape(count, groups, size)
        targets.append(torch.einsum("rga,rgai->rgi", wh, chunk).reshape(count, groups * k))
    system, target, start = torch.cat(systems), torch.cat(targets), start.reshape(rows, groups * k)
    diagonal = system.diagonal(dim1=1, dim2=2)
    unused = diagonal <= 0  # a feature of all zeros (a group whose levels are all 0) multiplies nothing
    diagonal.copy_(torch.where(unused, torch.ones_like(diagonal), diagonal))
    solved, info = torch.linalg.solve_ex(system, torch.where(unused, start, target))
    return torch.where((info == 0)[:, None], solved, start).reshape(rows, groups, k)
