"""GPTQ (Frantar et al., 2022): calibrated 3/4/8-bit integer weights in pure PyTorch (CPU and CUDA).

Each layer's columns are rounded one at a time; each rounding error is spread over the columns not
yet quantized through the upper Cholesky factor of ``H^-1``, with ``H = 2/n·XᵀX`` from the layer's
calibration inputs ``X``, which lowers ``||WX - QX||²`` well below round-to-nearest.

Sequential and memory-bounded (:mod:`quantcli.blockwise`): one decoder block at a time, each layer's
Hessian taken on the outputs of the blocks and layers already quantized.

``act_order`` visits columns by decreasing ``diag(H)`` with *static* groups: scales come from the
original weights in plain group order, so the checkpoint keeps the plain group layout
(compressed-tensors has no ``g_idx``). Without it, a group's scale is computed from its updated
weights when GPTQ first reaches it. The group rule is :func:`plan_layouts`' (172-wide layers go
per channel). Layers no calibration pass reaches fall back to round-to-nearest, with a note.

``clip_search`` (default on) runs each row with its range shrunk by ``CLIP_SHRINKS`` and keeps the
candidate with the lowest output error on the calibration inputs.

Bit-identical for a given seed, device and thread count. Rounding decisions cascade, so another
calibration draw, or another thread count (which reorders float sums), gives a different model of
similar quality: ``benchmarks/methods.py`` reports the spread over seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantcli import ops
from quantcli.blockwise import quantize_blockwise
from quantcli.errors import InputError
from quantcli.intweights import IntGridConfig, IntLayout, IntWeights, plan_layouts
from quantcli.methods import register_method
from quantcli.methods.base import QuantizedModel, QuantizeRequest, Quantizer
from quantcli.models import set_weight_matrix, weight_matrix

DAMP_RETRIES = 4  # times damping is multiplied by 10 before a layer falls back to round-to-nearest
CLIP_SHRINKS = tuple(round(1 - 0.05 * step, 2) for step in range(10))  # 1.0 ... 0.55 of each row's range
PASS_ELEMENTS = 2**26  # weight elements per GPTQ pass when clipping candidates are stacked (256 MiB fp32)


@dataclass(frozen=True)
class GPTQConfig(IntGridConfig):
    """The shared integer grid plus ``damp``: fraction of the mean of ``diag(H)`` added to it;
    ``block_size``: columns per lazy update; ``clip_search``: pick each row's range by its output
    error after GPTQ (see :func:`gptq_quantize`)."""

    act_order: bool = True
    clip_search: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise InputError(f"gptq damp must be between 0 and 1 (a fraction of the mean Hessian diagonal), got {self.damp}. Use e.g. 0.01.")
        if self.block_size <= 0:
            raise InputError(f"gptq block_size must be a positive number of columns, got {self.block_size}. Use e.g. 128.")


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


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, layout: IntLayout, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False,
                  codebook: torch.Tensor | None = None, clip_search: bool = False) -> tuple[IntWeights, list[str]]:
    """GPTQ one ``[out, in]`` weight given its Hessian; returns its integers and notes on any fallback.

    ``ops.dequantize`` of the result is exactly what the error feedback assumed. Inputs never active
    in calibration (``diag(H) = 0``) get a unit diagonal: rounded to nearest, coupled to nothing.
    With a ``codebook`` (e.g. bitsandbytes' NF4 values) the grid is ``codebook * absmax`` of each
    static group of the original weights, and ``q`` holds codebook indices (``ops.dequantize_codebook``).
    ``clip_search`` runs GPTQ with each row's range shrunk by every factor in ``CLIP_SHRINKS`` and
    keeps, per row, the one with the lowest output error ``(w - ŵ) H (w - ŵ)ᵀ`` (rows are independent).
    """
    matrix = weight.detach().float()
    hessian = hessian.detach().float().clone()
    out_features, columns = matrix.shape
    notes: list[str] = []
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    order = torch.arange(columns, device=matrix.device)
    if act_order:
        order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    upper, used_damp = _upper_inverse_cholesky(hessian[order][:, order], damp)
    if upper is None:
        notes.append(f"round-to-nearest: Hessian not positive definite even with damp {used_damp / 10:g}")
        upper = torch.eye(columns, device=matrix.device)  # no error feedback: plain rounding
    elif used_damp != damp:
        notes.append(f"damp raised to {used_damp:g} for a positive definite Hessian")

    static = layout.group_size is None or act_order or codebook is not None
    shrinks = CLIP_SHRINKS if clip_search else (1.0,)
    per_pass = max(1, PASS_ELEMENTS // matrix.numel())
    rows = torch.arange(out_features, device=matrix.device)
    best: tuple[torch.Tensor, ...] | None = None  # q, scale, zero_point and output error of each row's best candidate
    for first in range(0, len(shrinks), per_pass):
        chunk = torch.tensor(shrinks[first : first + per_pass], device=matrix.device)
        candidates = matrix.repeat(len(chunk), 1)
        *found, rounded = _quantize_columns(candidates, chunk.repeat_interleave(out_features)[:, None], upper, order, static,
                                            layout, block_size, codebook, weight.dtype)
        error = candidates - rounded
        loss = ((error @ hessian) * error).sum(dim=1)
        pick = loss.reshape(len(chunk), out_features).argmin(dim=0) * out_features + rows
        found = (*(tensor[pick] for tensor in found), loss[pick])
        best = found if best is None else _lower_error_rows(best, found)
    q, scale, zero_point, _ = best
    return IntWeights(q, scale if codebook is not None else scale.to(weight.dtype), zero_point, layout), notes


def _lower_error_rows(old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Per row, whichever of two ``(q, scale, zero_point, error)`` candidates has the lower error."""
    better = new[-1] < old[-1]
    return tuple(torch.where(better.reshape(-1, *[1] * (n.dim() - 1)), n, o) for n, o in zip(new, old))


def _quantize_columns(matrix: torch.Tensor, shrink: torch.Tensor, upper: torch.Tensor, order: torch.Tensor, static: bool,
                      layout: IntLayout, block_size: int, codebook: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """GPTQ's column loop over ``matrix`` (rows' ranges scaled by ``shrink``, ``[rows, 1]``), visiting
    columns in ``order`` with ``upper`` the Cholesky factor for that order; ``static`` groups take
    their scales from ``matrix`` up front. Returns ``q``, ``scale``, ``zero_point`` and the rounded
    values, all in the plain column order."""
    bits, group_size = layout.bits, layout.group_size
    out_features, columns = matrix.shape

    def qparams(values: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = ops.compute_qparams(values * shrink, bits, layout.symmetric, size, layout.observer)
        return scale.to(dtype).float(), zero_point  # the grid the stored scale (model dtype) gives

    groups = 1 if group_size is None else columns // group_size
    if codebook is not None:
        absmax = (matrix * shrink).reshape(out_features, groups, -1).abs().amax(dim=-1)
        scale, zero_point = torch.where(absmax == 0, torch.ones_like(absmax), absmax), torch.zeros_like(absmax, dtype=torch.int8)
    elif static:
        scale, zero_point = qparams(matrix, group_size)
    else:
        scale = torch.ones(out_features, groups, device=matrix.device)
        zero_point = torch.zeros(out_features, groups, dtype=torch.int8, device=matrix.device)
    matrix = matrix[:, order].clone()
    group_of = (order // group_size if group_size else torch.zeros_like(order)).tolist()

    q = torch.zeros(out_features, columns, dtype=torch.int8, device=matrix.device)
    rounded = torch.zeros_like(matrix)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = matrix[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column, group = start + i, group_of[start + i]
            if not static and column % group_size == 0:
                pending = block[:, i : i + group_size]
                if i + group_size > end - start:  # the group runs past this block: apply its pending updates
                    beyond = slice(end, column + group_size)
                    pending = torch.cat([pending, matrix[:, beyond] - errors[:, :i] @ upper[start:column, beyond]], dim=1)
                scale[:, group : group + 1], zero_point[:, group : group + 1] = qparams(pending, None)
            s, z = scale[:, group : group + 1], zero_point[:, group : group + 1]
            if codebook is None:
                q[:, column : column + 1] = ops.quantize(block[:, i : i + 1], s, z, bits, None)
                rounded[:, column] = ops.dequantize(q[:, column : column + 1], s, z, None)[:, 0]
            else:
                q[:, column] = ops.quantize_to_codebook(block[:, i], s[:, 0], codebook).to(torch.int8)
                rounded[:, column] = ops.dequantize_codebook(q[:, column], s[:, 0], codebook)
            errors[:, i] = (block[:, i] - rounded[:, column]) / upper[column, column]
            block[:, i:] -= errors[:, i : i + 1] * upper[column : column + 1, column:end]
        matrix[:, end:] -= errors @ upper[start:end, end:]
    inverse = torch.argsort(order)
    return q[:, inverse], scale, zero_point, rounded[:, inverse]


@register_method
class GPTQQuantizer(Quantizer):
    name = "gptq"
    summary = "GPTQ, calibrated block by block, pure PyTorch (INT8/INT4/INT3, groups, act-order, clip search); compressed-tensors output"
    supported_bits = (8, 4, 3)
    config_class = GPTQConfig
    needs_calibration = True
    output_format = "compressed-tensors"

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        from quantcli.formats.compressed_tensors import compressed_result

        config, model = request.config, request.model
        if request.calibration is None:
            raise InputError("gptq needs calibration data: pass calibration token windows in the request.")
        modules = dict(model.named_modules())
        plan = plan_layouts(model, request.layers, config.bits, config.symmetric, config.group_size, config.observer)
        notes: dict[str, list[str]] = {name: [note] if note else [] for name, (_, note) in plan.items()}

        def finish(name: str, hessian: torch.Tensor | None) -> IntWeights:
            layout, module, matrix = plan[name][0], modules[name], weight_matrix(modules[name])
            if hessian is None:  # zero Hessian: every input unseen, so GPTQ rounds to nearest
                notes[name].append("round-to-nearest: no calibration pass through the decoder blocks reaches it")
                hessian = torch.zeros(matrix.shape[1], matrix.shape[1], device=matrix.device)
            layer, extra = gptq_quantize(matrix, hessian, layout, config.damp, config.block_size, config.act_order, clip_search=config.clip_search)
            notes[name].extend(extra)
            set_weight_matrix(module, ops.dequantize(layer.q, layer.scale, layer.zero_point, layout.group_size))
            request.progress(1)
            return layer

        blocks = request.block_source(tuple(plan))
        stats = quantize_blockwise(blocks, tuple(plan), request.calibration, finish)
        options = {key: value for key, value in asdict(config).items() if key != "bits"}
        return compressed_result(model, self.name, config.bits, options, blocks.records, notes, stats)
