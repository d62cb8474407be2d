"""GPTQ's solver (Frantar et al., 2022) for one ``[out, in]`` weight and its Hessian, pure PyTorch.

Each column is rounded in turn; each rounding error is spread over the columns not yet quantized
through the upper Cholesky factor of ``H^-1``, with ``H = 2/n·XᵀX`` from the layer's calibration
inputs ``X``, which lowers ``||WX - QX||²`` well below round-to-nearest. The grid is an integer
layout (:func:`gptq_quantize`, also with a codebook such as NF4) or an external block grid
(:func:`gptq_on_grid`, GGUF's types). The method around it is :mod:`quantcli.methods.gptq`.

``act_order`` visits columns by decreasing ``diag(H)`` with *static* groups: scales come from the
original weights in plain group order, so the checkpoint keeps the plain group layout
(compressed-tensors has no ``g_idx``). Without it, a group's scale is computed from its updated
weights when GPTQ first reaches it.

``clip_search`` scores each row rounded to nearest with its range shrunk by each of
``CLIP_SHRINKS`` by its output error on the calibration inputs, runs GPTQ on the best
``CLIP_FINALISTS`` and on the full range, and keeps the one with the lowest output error.

``cross``: GPTAQ's full-precision target (:mod:`quantcli.quant.gptaq`).

Bit-identical for a given input, device and thread count. Rounding decisions cascade, so another
calibration draw, or another thread count (which reorders float sums), gives a different model of
similar quality: ``benchmarks/methods.py`` reports the spread over seeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from quantcli.quant import ops
from quantcli.quant.gptaq import asymmetry_update, target_error
from quantcli.quant.intgrid import IntLayout, IntWeights
from quantcli.quant.refit import output_error as _output_error
from quantcli.quant.refit import refit_scales

DAMP_RETRIES = 4  # times damping is multiplied by 10 before a layer falls back to round-to-nearest
CLIP_SHRINKS = tuple(round(1 - 0.05 * step, 2) for step in range(10))  # 1.0 ... 0.55 of each row's range
CLIP_FINALISTS = 2  # clips per row, shortlisted by their round-to-nearest error, that GPTQ runs besides the full range
PASS_ELEMENTS = 2**26  # weight elements per GPTQ pass when clipping candidates are stacked (256 MiB fp32)


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1``, raising ``damp`` tenfold on failure."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean = torch.diag(hessian).mean()
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper, damp
        damp *= 10
    return None, damp


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    layout: IntLayout,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    codebook: torch.Tensor | None = None,
    clip_search: bool = False,
    refit: bool = False,
    cross: torch.Tensor | None = None,
) -> tuple[IntWeights, list[str]]:
    """GPTQ one ``[out, in]`` weight given its Hessian; returns its integers and notes on any fallback.

    ``ops.dequantize`` of the result is exactly what the error feedback assumed. Inputs never active
    in calibration (``diag(H) = 0``) get a unit diagonal: rounded to nearest, coupled to nothing.
    With a ``codebook`` (e.g. bitsandbytes' NF4 values) the grid is ``codebook * absmax`` of each
    static group of the original weights, and ``q`` holds codebook indices (``ops.dequantize_codebook``).
    ``clip_search`` shortlists each row's ``CLIP_FINALISTS`` clips in ``CLIP_SHRINKS`` by the output
    error ``(w - ŵ) H (w - ŵ)ᵀ`` of round-to-nearest, runs GPTQ with them and with the full range, and
    keeps, per row, the result with the lowest output error (rows are independent). ``refit`` then refits
    the chosen integers' scales by least squares on ``H`` (:mod:`quantcli.quant.refit`). ``cross``: GPTAQ's term.
    """
    matrix = weight.detach().float()
    out_features = matrix.shape[0]
    scale_dtype = layout.scale_dtype_for(weight.dtype)
    hessian, order, upper, notes, shift, cross = _factor(hessian, act_order, damp, cross)
    static = layout.group_size is None or act_order or codebook is not None
    rows, shrinks = [torch.arange(out_features, device=matrix.device)], [torch.ones(out_features, device=matrix.device)]
    if clip_search:  # a cheap pre-pass shortlists each row's clips; GPTQ runs on them and on the full range
        for finalist in _clip_by_rounding(matrix, hessian, layout, codebook, scale_dtype):
            clipped = torch.nonzero(finalist != 1).flatten()
            rows, shrinks = rows + [clipped], shrinks + [finalist[clipped]]
    row_of = torch.cat(rows)
    candidates = matrix[row_of]
    shrink = torch.cat(shrinks)[:, None]
    *found, rounded = _quantize_columns(
        candidates, shrink, upper, order, static, layout, block_size, codebook, scale_dtype, None, shift
    )
    pick = rows[0]  # the full-range candidates come first
    if len(row_of) > out_features:  # clipped candidates too: keep each row's lowest output error
        pick = _first_best(target_error(candidates, rounded, hessian, cross), row_of, out_features)
    q, scale, zero_point = (tensor[pick] for tensor in found)
    if refit:
        bits = None if layout.symmetric else layout.bits
        scale, zero_point, _ = refit_scales(matrix, hessian, q, scale, zero_point, codebook, scale_dtype, bits)
    return IntWeights(q, scale if codebook is not None else scale.to(weight.dtype), zero_point, layout), notes


def _factor(
    hessian: torch.Tensor, act_order: bool, damp: float, cross: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor | None, torch.Tensor | None]:
    """The Hessian with unseen inputs given a unit diagonal, the column order, the upper Cholesky
    factor of its damped inverse in that order (identity, with a note, when none exists), notes, and
    with GPTAQ's ``cross`` (its unseen columns zeroed) its update ``P`` in that order and itself."""
    hessian = hessian.detach().float().clone()
    columns, notes = hessian.shape[0], []
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    order = torch.arange(columns, device=hessian.device)
    if act_order:
        order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    upper, used_damp = _upper_inverse_cholesky(hessian[order][:, order], damp)
    if upper is None:
        notes.append(f"round-to-nearest: Hessian not positive definite even with damp {used_damp / 10:g}")
        upper, cross = torch.eye(columns, device=hessian.device), None  # no error feedback: plain rounding
    elif used_damp != damp:
        notes.append(f"damp raised to {used_damp:g} for a positive definite Hessian")
    return hessian, order, upper, notes, *asymmetry_update(cross, dead, order, upper)


def gptq_on_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    make_grid: Callable[[torch.Tensor], Any],
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    cross: torch.Tensor | None = None,
) -> tuple[Any, list[str]]:
    """GPTQ one ``[out, in]`` weight onto an external grid whose scales come from the weights it is
    built on (e.g. a GGUF block type's, :class:`quantcli.formats.gguf.types.FixedGrid`):
    ``make_grid(matrix)`` gives an object with ``type.bits``, ``block`` (inputs per group),
    ``round(column, group) -> (codes, values)``, ``values(matrix)`` and ``record(codes, rows)``.
    ``clip_search`` and ``cross`` as in :func:`gptq_quantize`, the grids built on the rows scaled by each
    shrink. Returns the layer's record and notes."""
    matrix = weight.detach().float()
    out_features = matrix.shape[0]
    hessian, order, upper, notes, shift, cross = _factor(hessian, act_order, damp, cross)
    rows, shrinks = [torch.arange(out_features, device=matrix.device)], [torch.ones(out_features, device=matrix.device)]
    if clip_search:
        losses = torch.stack(
            [_output_error(matrix - make_grid(matrix * shrink).values(matrix), hessian) for shrink in CLIP_SHRINKS]
        )
        for finalist in torch.tensor(CLIP_SHRINKS, device=matrix.device)[
            torch.sort(losses, dim=0, stable=True).indices[:CLIP_FINALISTS]
        ]:
            clipped = torch.nonzero(finalist != 1).flatten()
            rows, shrinks = rows + [clipped], shrinks + [finalist[clipped]]
    row_of = torch.cat(rows)
    candidates = matrix[row_of]
    grid = make_grid(candidates * torch.cat(shrinks)[:, None])
    layout = IntLayout(grid.type.bits, True, grid.block)
    codes, _, _, rounded = _quantize_columns(
        candidates, None, upper, order, True, layout, block_size, None, weight.dtype, grid, shift
    )
    pick = rows[0]
    if len(row_of) > out_features:
        pick = _first_best(target_error(candidates, rounded, hessian, cross), row_of, out_features)
    return grid.record(codes, pick), notes


def _first_best(loss: torch.Tensor, row_of: torch.Tensor, rows: int) -> torch.Tensor:
    """Per row, the index of its first candidate (``row_of``: each candidate's row) with the lowest loss."""
    lowest = torch.full((rows,), float("inf"), device=loss.device).scatter_reduce(0, row_of, loss, "amin")
    index = torch.where(loss == lowest[row_of], torch.arange(len(row_of), device=loss.device), len(row_of))
    return torch.full((rows,), len(row_of), device=loss.device).scatter_reduce(0, row_of, index, "amin")


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


def _clip_by_rounding(
    matrix: torch.Tensor, hessian: torch.Tensor, layout: IntLayout, codebook: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[CLIP_FINALISTS, rows]``: per row, the factors of ``CLIP_SHRINKS`` whose round-to-nearest weights
    have the lowest output error, best first: one matrix product per factor instead of one GPTQ run
    each (stacked ``PASS_ELEMENTS`` at a time)."""
    out_features = matrix.shape[0]
    per_pass = max(1, PASS_ELEMENTS // matrix.numel())
    losses = []
    for first in range(0, len(CLIP_SHRINKS), per_pass):
        chunk = torch.tensor(CLIP_SHRINKS[first : first + per_pass], device=matrix.device)
        shrink = chunk.repeat_interleave(out_features)[:, None]
        candidates = matrix.repeat(len(chunk), 1)
        scale, zero_point = _static_grid(candidates, shrink, layout, codebook, dtype)
        columns = _group_columns(torch.arange(matrix.shape[1], device=matrix.device), layout.group_size)
        if codebook is None:
            step, zero = scale[:, columns], zero_point.float()[:, columns]
            rounded = (torch.round(candidates / step + zero).clamp_(*ops.int_range(layout.bits)) - zero) * step
        else:
            rounded = ops.dequantize_codebook(
                ops.quantize_to_codebook(candidates, scale[:, columns], codebook), scale[:, columns], codebook
            )
        losses.append(_output_error(candidates - rounded, hessian).reshape(len(chunk), out_features))
    ranked = torch.sort(torch.cat(losses), dim=0, stable=True).indices[:CLIP_FINALISTS]
    return torch.tensor(CLIP_SHRINKS, device=matrix.device)[ranked]


def _group_columns(columns: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The group index of each column."""
    return columns // group_size if group_size else torch.zeros_like(columns)


def _static_grid(
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


def _quantize_columns(
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
    their scales from ``matrix`` up front, an external ``grid`` (see :func:`gptq_on_grid`) rounds
    instead; GPTAQ's ``shift`` (``P`` in that order) adds its asymmetry update. Returns ``q``, ``scale``,
    ``zero_point`` and the rounded values, all in the plain column order."""
    bits, group_size = layout.bits, layout.group_size
    qmin, qmax = ops.int_range(bits)
    out_features, columns = matrix.shape
    if grid is not None:  # the grid holds its scales; these are placeholders
        scale = torch.ones(out_features, columns // group_size, device=matrix.device)
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    elif static:
        scale, zero_point = _static_grid(matrix, shrink, layout, codebook, dtype)
    else:
        scale = torch.ones(out_features, columns // group_size, device=matrix.device)
        zero_point = torch.zeros(out_features, columns // group_size, dtype=torch.int8, device=matrix.device)
    group_of = _group_columns(order, group_size)
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
