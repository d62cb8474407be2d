"""Least-squares refit of a quantized layer's group scales once its integers are fixed (GPTQ's
``refit_scales``).

GPTQ chooses each row's integers for scales set before it runs (from the weights' ranges). With the
integers fixed, a row's dequantized weights ``ŵ_j = level_j · s_g(j)`` (``level = q - zero_point``, or the
codebook value of ``q``) are linear in its group scales ``s``, so the scales that minimise the layer's
output error on the calibration inputs, ``(w - ŵ) H (w - ŵ)ᵀ``, solve one small linear system per row,
``(Lᵀ H L) s = Lᵀ H w`` with ``L`` the ``[in, groups]`` matrix of the row's levels (one unknown per group,
coupled through ``H``). The solution is rounded to the scales' storage dtype and kept only for the rows
whose error it lowers, so no row gets worse. Integer zero points stay as they are.
"""

from __future__ import annotations

import torch

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
) -> tuple[torch.Tensor, int]:
    """The scales (``[rows, groups]``, in ``scale``'s dtype) minimising each row's output error for the fixed
    integers ``q`` (``[rows, in]``; levels ``q - zero_point``, or ``codebook[q]`` with a codebook, whose scales
    are stored in float32), rounded to ``dtype``, each row refit only where that lowers its error; and how many
    rows changed."""
    rows, columns = q.shape
    groups = scale.shape[1]
    if codebook is not None:
        levels, dtype = codebook.float()[q.long()], torch.float32
    else:
        levels = q.float() - zero_point.float().repeat_interleave(columns // groups, dim=1)
    matrix, hessian = weight.float(), hessian.float()
    old = scale.float()
    per_chunk = max(1, ROW_ELEMENTS // (columns * groups))
    systems, targets = [], []
    blocks = hessian.reshape(columns, groups, columns // groups).permute(1, 0, 2)  # [groups, in, size]
    for first in range(0, rows, per_chunk):
        chunk = levels[first : first + per_chunk].reshape(-1, groups, columns // groups)  # [r, groups, size]
        # (H L)[r, j, h] = sum over group h's inputs b of H[j, b] level[r, b]
        hl = torch.bmm(blocks, chunk.permute(1, 2, 0)).permute(2, 1, 0)  # [r, in, groups]
        systems.append(torch.einsum("rga,rgah->rgh", chunk, hl.reshape(len(chunk), groups, -1, groups)))
        targets.append(((matrix[first : first + per_chunk] @ hessian).reshape_as(chunk) * chunk).sum(-1))
    system, target = torch.cat(systems), torch.cat(targets)
    unused = system.diagonal(dim1=1, dim2=2) <= 0  # a group of all-zero levels: its scale multiplies nothing
    system.diagonal(dim1=1, dim2=2).copy_(torch.where(unused, torch.ones_like(target), system.diagonal(dim1=1, dim2=2)))
    target = torch.where(unused, old, target)
    solved, info = torch.linalg.solve_ex(system, target)
    fitted = solved.to(dtype).float()
    usable = (info == 0)[:, None] & torch.isfinite(fitted) & (fitted != 0)
    fitted = torch.where(usable, fitted, old)
    size = columns // groups
    before = output_error(matrix - levels * old.repeat_interleave(size, dim=1), hessian)
    after = output_error(matrix - levels * fitted.repeat_interleave(size, dim=1), hessian)
    better = after < before
    return torch.where(better[:, None], fitted, old).to(scale.dtype), int(better.sum())
