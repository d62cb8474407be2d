"""GPTQ's column loop (:mod:`quantcli.quant.gptq_solver`): rounds one column at a time and spreads
each rounding error over the columns not yet visited, on an integer grid, a codebook or an external
grid; also the static groups' grid that the loop and the solver's clip search share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from quantcli.quant import ops
from quantcli.quant.intgrid import IntLayout


def quantize_columns(
    matrix: torch.Tensor,
    shrink: torch.Tensor,
    upper: torch.Tensor,
    order: torch.Tensor,
    static: bool,
    layout: IntLayout,
    block_size: int,
    codebook: torch.Tensor | None,
    dtype: torch.dtype,
    grid: Any = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """GPTQ's column loop over ``matrix`` (rows' ranges scaled by ``shrink``, ``[rows, 1]``), visiting
    columns in ``order`` with ``upper`` the Cholesky factor for that order; ``static`` groups take
    their scales from ``matrix`` up front, an external ``grid`` (see
    :func:`quantcli.quant.gptq_solver.gptq_on_grid`) rounds instead; GPTAQ's ``shift`` (``P`` in that
    order) adds its asymmetry update. Returns ``q``, ``scale``, ``zero_point`` and the rounded values,
    all in the plain column order."""
    bits, group_size = layout.bits, layout.group_size
    qmin, qmax = ops.int_range(bits)
    out_features, columns = matrix.shape
    if grid is not None:  # the grid holds its scales; these are placeholders
        scale = torch.ones(out_features, columns // group_size, device=matrix.device)
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    elif static:
        scale, zero_point = static_grid(matrix, shrink, layout, codebook, dtype)
    else:
        scale = torch.ones(out_features, columns // group_size, device=matrix.device)
        zero_point = torch.zeros(out_features, columns // group_size, dtype=torch.int8, device=matrix.device)
    group_of = group_columns(order, group_size)
    work = matrix[:, order].t().contiguous()  # [columns, rows] in visiting order: each column is one contiguous row
    step, zero = (
        scale[:, group_of].t().contiguous(),
        zero_point.float()[:, group_of].t().contiguous(),
    )  # each column's grid
    diagonal = upper.diagonal()
    codes, rounded = torch.empty_like(work), torch.empty_like(work)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, errors = (
            work[start:end],
            torch.empty(end - start, out_features, device=work.device),
        )  # block: a view of work
        with _one_thread():
            for i in range(end - start):
                column = start + i
                if (
                    not static and column % group_size == 0
                ):  # dynamic group: its grid from its weights as updated so far
                    pending = block[i : i + group_size]
                    if i + group_size > end - start:  # the group runs past this block: apply its pending updates
                        beyond = slice(end, column + group_size)
                        pending = torch.cat([pending, work[beyond] - upper[start:column, beyond].t() @ errors[:i]])
                    group = int(group_of[column])
                    s, z = ops.compute_qparams(
                        pending.t() * shrink, bits, layout.symmetric, None, layout.observer, dtype
                    )
                    scale[:, group : group + 1], zero_point[:, group : group + 1] = s.float(), z
                    step[column : column + group_size], zero[column : column + group_size] = (
                        scale[:, group],
                        z[:, 0].float(),
                    )
                weights, s, z = block[i], step[column], zero[column]
                if grid is not None:
                    code, value = grid.round(weights, int(group_of[column]))
                elif codebook is None:  # ops.quantize then ops.dequantize, one column
                    code = torch.round(weights / s + z).clamp_(qmin, qmax)
                    value = (code - z) * s
                else:
                    code = ops.quantize_to_codebook(weights, s, codebook).float()
                    value = ops.dequantize_codebook(code.long(), s, codebook)
                codes[column], rounded[column] = code, value
                torch.div(weights - value, diagonal[column], out=errors[i])
                block[i + 1 :].addr_(upper[column, column + 1 : end], errors[i], alpha=-1)
                if shift is not None:  # row i of block keeps its weights as they were before rounding
                    block[i + 1 :].addr_(shift[column, column + 1 : end], weights)
        work[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1)
        if shift is not None:
            work[end:].addmm_(shift[start:end, end:].t(), block)
    inverse = torch.argsort(order)
    return codes.t()[:, inverse].to(torch.int8), scale, zero_point, rounded.t()[:, inverse]


def static_grid(
    matrix: torch.Tensor, shrink: torch.Tensor, layout: IntLayout, codebook: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``scale`` and int8 ``zero_point`` per group from ``matrix`` with each row's range scaled by
    ``shrink``: the grid the stored scale (rounded to ``dtype``, its storage dtype) gives, or ``codebook · absmax``
    with a codebook."""
    if codebook is not None:
        groups = 1 if layout.group_size is None else matrix.shape[1] // layout.group_size
        absmax = (matrix * shrink).reshape(matrix.shape[0], groups, -1).abs().amax(dim=-1)
        return torch.where(absmax == 0, torch.ones_like(absmax), absmax), torch.zeros_like(absmax, dtype=torch.int8)
    scale, zero_point = ops.compute_qparams(
        matrix * shrink, layout.bits, layout.symmetric, layout.group_size, layout.observer, dtype
    )
    return scale.float(), zero_point


def group_columns(columns: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The group index of each column."""
    return columns // group_size if group_size else torch.zeros_like(columns)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """GPTQ's column loop is thousands of small ops: threads only add synchronisation, which costs
    the most on a busy machine (on 2 shared cores a layer took 20x longer with 2 threads than 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
