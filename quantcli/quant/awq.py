"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"): per-input-channel scales chosen before a
decoder block's layers are quantized, folded into the operation that produces their input.

For each group of layers reading one input ``X`` (q/k/v, gate/up, ...), a channel ``j`` whose inputs are
large in magnitude matters more to the outputs, so its weights are multiplied by ``s_j`` (finer relative
rounding) and the producer of ``X`` divides its channel ``j`` by ``s_j``: the model computes the same
function before quantization. ``s = mean|X|^α`` (normalised so ``max(s)·min(s) = 1``), with ``α`` searched
in ``0, 0.05, ... 0.95`` per group by the group's output error ``Σ (w - ŵ) H (w - ŵ)ᵀ`` on the calibration
inputs (``H = 2/n·XᵀX``), the weights rounded on the run's own grid (``α = 0`` is plain rounding, so the
error on those inputs never grows). The reference code's auto-clip is left out (GPTQ has its own clip search).

The producer is found generically, not from a table of architectures: among the modules of the block that
ran before the group and own one parameter per channel of ``X`` (a norm's weight, a linear's output rows),
latest first, the first for which folding random factors (producer ÷ r, the group's columns × r) leaves
the block's output unchanged on a calibration batch. A group with none (SmolLM2's ``o_proj``: grouped-query
attention's ``v_proj`` has fewer channels; the experts of a block whose router reads the same norm) is left
unscaled, with a note in the layer map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from quantcli.quant import ops
from quantcli.quant.intgrid import IntLayout
from quantcli.quant.layers import is_conv1d, weight_matrix
from quantcli.quant.smoothing import fold_scales

ALPHAS = tuple(step / 20 for step in range(20))  # the reference code's grid (n_grid = 20)
PRODUCER_TRIES = 3  # candidate producers checked per group, latest first
FOLD_TOLERANCE = 1e-4  # relative change of the block's update that a valid fold may cause (fp32 rounding)


def scale_block(
    block: torch.nn.Module,
    modules: dict[str, Any],
    groups: list[list[str]],
    inputs: list[tuple[torch.Tensor, tuple, dict]],
    rounded: Callable[[str, torch.Tensor], torch.Tensor],
) -> dict[str, str]:
    """AWQ-scale every group of ``block`` (layer names in run order, ``modules`` by name) on its calibration
    ``inputs`` (per mini-batch: hidden states, args, kwargs), ``rounded(name, matrix)`` giving a layer's
    ``[out, in]`` weights as the run's grid rounds them. Returns a layer-map note per layer."""
    hessians, magnitudes = _input_statistics([modules[group[0]] for group in groups], block, inputs)
    window = _first_window(block, inputs[0])
    order = _run_order(block, window)
    relative = {id(module): name for name, module in block.named_modules()}
    notes = {}
    for group, hessian, magnitude in zip(groups, hessians, magnitudes):
        consumers = [modules[name] for name in group]
        producer = _foldable_producer(block, consumers, order, window)
        if producer is None:
            note = "awq: not scaled (no operation before it can absorb per-channel scales)"
        else:
            alpha, factors = _search(group, consumers, hessian, magnitude, rounded)
            fold_scales(producer, consumers, factors)
            prefix = group[0][: len(group[0]) - len(relative[id(consumers[0])])]
            note = (
                f"awq: inputs scaled by mean|x|^{alpha:g} ({factors.min():.3g} to {factors.max():.3g}),"
                f" folded into {prefix}{relative[id(producer)]}"
            )
        notes.update(dict.fromkeys(group, note))
    return notes


def _block_output(block: torch.nn.Module, batch: tuple[torch.Tensor, tuple, dict]) -> torch.Tensor:
    hidden, args, kwargs = batch
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _first_window(block: torch.nn.Module, batch: tuple[torch.Tensor, tuple, dict]) -> tuple[torch.Tensor, tuple, dict]:
    """The first calibration window of a mini-batch (every tensor argument with the batch's length cut to 1),
    enough to check a fold; the whole mini-batch when the block does not run on the cut."""
    hidden, args, kwargs = batch
    rows = hidden.shape[0]

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            return value[:1]
        return tuple(cut(item) for item in value) if isinstance(value, tuple) else value

    window = (hidden[:1], cut(args), {key: cut(value) for key, value in kwargs.items()})
    try:
        _block_output(block, window)
    except (RuntimeError, ValueError, IndexError):  # a shape mismatch: some argument's first axis is not the batch
        return batch
    return window


def _input_statistics(
    firsts: list[Any], block: torch.nn.Module, inputs: list[tuple[torch.Tensor, tuple, dict]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group (its first layer in ``firsts``): ``2/n·XᵀX`` and ``mean|X|`` per channel over every token."""
    columns = [weight_matrix(module).shape[1] for module in firsts]
    hessians = [torch.zeros(c, c, device=module.weight.device) for c, module in zip(columns, firsts)]
    sums = [torch.zeros(c, device=module.weight.device) for c, module in zip(columns, firsts)]
    counts = [0] * len(firsts)

    def hook_for(index: int) -> Any:
        def hook(module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            counts[index] += x.shape[0]
            hessians[index].addmm_(x.t(), x, alpha=2)
            sums[index].add_(x.abs().sum(0))

        return hook

    handles = [module.register_forward_pre_hook(hook_for(index)) for index, module in enumerate(firsts)]
    try:
        for batch in inputs:
            _block_output(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    seen = [max(count, 1) for count in counts]
    return [h / n for h, n in zip(hessians, seen)], [s / n for s, n in zip(sums, seen)]


def _run_order(block: torch.nn.Module, batch: tuple[torch.Tensor, tuple, dict]) -> list[Any]:
    """The block's modules that own a weight, in the order of their first call."""
    order: list[Any] = []
    owners = [module for module in block.modules() if isinstance(getattr(module, "weight", None), torch.Tensor)]
    handles = [
        module.register_forward_pre_hook(lambda m, a: None if any(m is o for o in order) else order.append(m))
        for module in owners
    ]
    try:
        _block_output(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _channels_out(module: Any) -> int | None:
    """How many output channels ``module`` scales one by one: a norm's (1-D weight) or a linear's rows."""
    if module.weight.dim() == 1:
        return module.weight.numel()
    if isinstance(module, torch.nn.Linear) or is_conv1d(module):
        return weight_matrix(module).shape[0]
    return None


def _foldable_producer(
    block: torch.nn.Module, consumers: list[Any], order: list[Any], batch: tuple[torch.Tensor, tuple, dict]
) -> Any:
    """The latest module before ``consumers`` whose output channels they alone read, proven by folding random
    factors into it and them and finding the block's output unchanged; None when no candidate passes."""
    width = weight_matrix(consumers[0]).shape[1]
    positions = [index for index, module in enumerate(order) if any(module is c for c in consumers)]
    before = order[: min(positions)] if positions else []
    candidates = [m for m in reversed(before) if _channels_out(m) == width][:PRODUCER_TRIES]
    if not candidates:
        return None
    hidden = batch[0]
    reference = _block_output(block, batch)
    update = (reference - hidden).norm() if reference.shape == hidden.shape else reference.norm()
    factors = torch.exp(torch.rand(width, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(hidden.device)
    for candidate in candidates:
        owners = [candidate, *consumers]
        saved = [(p, p.detach().clone()) for module in owners for p in module.parameters(recurse=False)]
        fold_scales(candidate, consumers, factors)
        change = (_block_output(block, batch) - reference).norm()
        for parameter, value in saved:
            parameter.data.copy_(value)
        tolerance = max(FOLD_TOLERANCE, 4 * torch.finfo(hidden.dtype).eps)
        if change <= tolerance * update:
            return candidate
    return None


def _search(
    names: list[str],
    consumers: list[Any],
    hessian: torch.Tensor,
    magnitude: torch.Tensor,
    rounded: Callable[[str, torch.Tensor], torch.Tensor],
) -> tuple[float, torch.Tensor]:
    """The ``α`` whose scales ``mean|x|^α`` give the group's rounded weights the lowest output error on ``H``."""
    weights = [weight_matrix(module).float() for module in consumers]
    best = (float("inf"), 0.0, torch.ones_like(magnitude))
    for alpha in ALPHAS:
        factors = magnitude.clamp(min=1e-4).pow(alpha)
        factors = factors / (factors.max() * factors.min()).sqrt()
        error = 0.0
        for name, weight in zip(names, weights):
            difference = weight - rounded(name, weight * factors).float() / factors
            error += float(((difference @ hessian) * difference).sum())
        if error < best[0]:
            best = (error, alpha, factors)
    return best[1], best[2]


def grid_rounding(plan: dict[str, IntLayout]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``rounded(name, matrix)`` for :func:`scale_block`: round-to-nearest on layer ``name``'s integer layout."""

    def rounded(name: str, matrix: torch.Tensor) -> torch.Tensor:
        layout = plan[name]
        dtype = layout.scale_dtype_for(matrix.dtype)
        scale, zero_point = ops.compute_qparams(
            matrix, layout.bits, layout.symmetric, layout.group_size, layout.observer, dtype
        )
        codes = ops.quantize(matrix, scale, zero_point, layout.bits, layout.group_size)
        return ops.dequantize(codes, scale, zero_point, layout.group_size)

    return rounded


def awq_step(model: Any, plan: dict[str, IntLayout], notes: dict[str, list[str]]) -> Callable[..., None]:
    """The ``prepare_block`` of :func:`quantcli.quant.blockwise.quantize_blockwise` that AWQ-scales each block
    of ``model`` for the integer layouts ``plan``, adding each layer's note to ``notes``."""
    modules = dict(model.named_modules())

    def prepare(block: torch.nn.Module, groups: list[list[str]], inputs: list) -> None:
        for name, note in scale_block(block, modules, groups, inputs, grid_rounding(plan)).items():
            notes[name].append(note)

    return prepare
