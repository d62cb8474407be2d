"""GPTQ's solver (Frantar et al., 2022) for one ``[out, in]`` weight and its Hessian, pure PyTorch.

Each column is rounded in turn; each rounding error is spread over the columns not yet quantized
through the upper Cholesky factor of ``H^-1``, with ``H = 2/n·XᵀX`` from the layer's calibration
inputs ``X``, which lowers ``||WX - QX||²`` well below round-to-nearest. The grid is an integer
layout (:func:`gptq_quantize`, also with a codebook such as NF4) or an external block grid
(:func:`gptq_on_grid`, GGUF's types). The column loop itself is :mod:`quantcli.quant.gptq_columns`;
the method around it is :mod:`quantcli.methods.gptq`.

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

from collections.abc import Callable
from typing import Any

import torch

from quantcli.quant import ops
from quantcli.quant.gptaq import asymmetry_update, target_error
from quantcli.quant.gptq_columns import group_columns, quantize_columns, static_grid
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
    *found, rounded = quantize_columns(
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
    codes, _, _, rounded = quantize_columns(
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
        scale, zero_point = static_grid(candidates, shrink, layout, codebook, dtype)
        columns = group_columns(torch.arange(matrix.shape[1], device=matrix.device), layout.group_size)
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
