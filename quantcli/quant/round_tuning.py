"""Block-wise rounding tuning: a decoder block's integer codes, chosen layer by layer (GPTQ), tuned together
so that the quantized block reproduces the full-precision block's outputs on the calibration inputs.

Each weight's code may move one step either way on its layer's fixed grid (scales untouched, so any grid a
format stores works: integer groups, NF4, GGUF block types): a continuous offset ``v`` in ``[-1, 1]`` per
weight, code ``clamp(round(c + v))`` with ``c`` the starting code, trained by AutoRound's signed gradient
descent (Cheng et al. 2023) with a straight-through estimator. As AutoRound starts from each weight's
position between two codes, ``v`` starts at the original weight's offset from ``c`` in code steps, within
``±HALF`` (so the starting codes are ``c``): the weights nearest a rounding midpoint flip first. The
gradient reaches ``v`` through the grid's local step (the value between the neighbouring codes), so grids
whose scales are negative (a ``signed`` observer, llama.cpp's Q4_0) or not uniform (NF4) move the right
way. The loss is the mean squared error of the block's outputs, run on the quantized model's inputs,
against the original block's outputs on the full-precision model's inputs
(:class:`quantcli.quant.reference.Reference`): one calibration mini-batch per step, in an order drawn from
``seed``; the learning rate decays linearly to zero. The result is kept only if its error on all
calibration mini-batches is below the starting codes' and, when given, a ``fallback`` set of layers' (GPTQ's
codes where tuning starts from round-to-nearest's: a block whose rounding tuning cannot rescue keeps them).

Optionally (``scales``), layers on an integer grid also tune one factor per group on their scales, as
AutoRound tunes its min/max range: ``(q - z) · s · (1 + f)`` with ``f`` in ``[-SCALE_RANGE, SCALE_RANGE]``,
trained with the codes by the same signed steps; the tuned scales are rounded to the scales' dtype
before the final error check, so the check sees what the format stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantcli.quant.reference import Inputs

HALF = 0.499  # the starting offsets' bound: below half a step, so that they round to the starting codes
SCALE_RANGE = 0.5  # how far a tuned scale factor may move from 1


@dataclass
class TunableLayer:
    """One layer of a block on its fixed grid: ``parameter`` (the weight's name inside the block), its
    starting ``codes`` (float, ``[out, in]``), the codes' range, ``values(codes) -> [out, in]`` fp32
    weights, the ``original`` fp32 weights, whether the module stores the weight transposed (GPT-2's Conv1D),
    and the dtype it holds weights in; on integer grids, ``scaled(codes, factors)``: the values with the
    scales multiplied by ``factors`` (rounded to the scales' dtype), for the optional scale tuning."""

    parameter: str
    codes: torch.Tensor
    lowest: int
    highest: int
    values: Callable[[torch.Tensor], torch.Tensor]
    original: torch.Tensor
    transposed: bool = False
    dtype: torch.dtype = torch.float32
    scaled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (codes, factors) -> values
    factors_shape: tuple[int, ...] = ()  # one factor per scale (integer grids), for ``scaled``

    def stored(self, values: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` fp32 values as the module holds its weight."""
        values = values.to(self.dtype)
        return values.t() if self.transposed else values


@dataclass
class Tuned:
    """Each layer's codes after tuning (the starting ones when tuning did not help), its scale factors
    (None: scales untouched), the block's output error on all calibration mini-batches before and after,
    its outputs with the codes kept, and whether those are the fallback layers' codes."""

    codes: dict[str, torch.Tensor]
    factors: dict[str, torch.Tensor | None]
    start_error: float
    error: float
    outputs: list[torch.Tensor]
    fell_back: bool = False


def _output(block: torch.nn.Module, weights: dict[str, torch.Tensor], one: tuple) -> torch.Tensor:
    hidden, args, kwargs = one
    out = torch.func.functional_call(block, weights, (hidden, *args), kwargs)
    return out[0] if isinstance(out, tuple) else out


def _weights(
    layers: list[TunableLayer], codes: list[torch.Tensor], factors: list[torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    return {
        layer.parameter: layer.stored(layer.values(code) if factor is None else layer.scaled(code, factor))
        for layer, code, factor in zip(layers, codes, factors, strict=True)
    }


def _error(
    block: torch.nn.Module, weights: dict[str, torch.Tensor], inputs: Inputs, targets: list
) -> tuple[float, list[torch.Tensor]]:
    """Mean squared error of the block's outputs over all calibration mini-batches, and the outputs."""
    outputs = [_output(block, weights, one) for one in inputs]
    total = sum(
        float(torch.nn.functional.mse_loss(out.float(), target.float(), reduction="sum"))
        for out, target in zip(outputs, targets, strict=True)
    )
    return total / sum(target.numel() for target in targets), outputs


def _slope(layer: TunableLayer) -> torch.Tensor:
    """Each weight's value change per code step between its neighbouring codes (the estimator's gradient)."""
    up, down = ((layer.codes + step).clamp(layer.lowest, layer.highest) for step in (1, -1))
    return (layer.values(up) - layer.values(down)) / (up - down).clamp(min=1)


def _start(layer: TunableLayer, slope: torch.Tensor) -> torch.Tensor:
    """The original weights' offsets from the starting codes, in code steps, within ``[-0.5, 0.5]``."""
    offset = (layer.original - layer.values(layer.codes)) / torch.where(slope == 0, torch.inf, slope)
    return offset.clamp(-HALF, HALF)


def tune_block(
    block: torch.nn.Module,
    layers: list[TunableLayer],
    inputs: Inputs,
    targets: list[torch.Tensor],
    iterations: int,
    learning_rate: float,
    seed: int,
    scales: bool = False,
    fallback: list[TunableLayer] | None = None,
) -> Tuned:
    """Tune ``layers``' codes (and with ``scales`` the scale factors of layers that have ``scaled``) so that
    ``block`` on ``inputs`` gives ``targets``; keep ``fallback``'s codes (the same layers on their own
    grids) where those give a lower error (see the module docstring)."""
    start = [layer.codes for layer in layers]
    untouched = [None] * len(layers)
    with torch.no_grad():
        start_error, start_outputs = _error(block, _weights(layers, start, untouched), inputs, targets)
    slopes = [_slope(layer) for layer in layers]
    offsets = [_start(layer, slope).requires_grad_() for layer, slope in zip(layers, slopes, strict=True)]
    factors = [
        torch.zeros(layer.factors_shape).requires_grad_() if scales and layer.scaled is not None else None
        for layer in layers
    ]
    trained = [(offset, 1.0) for offset in offsets] + [
        (factor, SCALE_RANGE) for factor in factors if factor is not None
    ]  # with each tensor's bound
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed)).tolist()

    def rounded(index: int) -> torch.Tensor:
        layer = layers[index]
        return torch.round(layer.codes + offsets[index].detach()).clamp_(layer.lowest, layer.highest)

    def value(index: int) -> torch.Tensor:
        layer, offset, factor = layers[index], offsets[index], factors[index]
        if factor is None:
            return layer.values(rounded(index)) + slopes[index] * (offset - offset.detach())
        return layer.scaled(rounded(index) + (offset - offset.detach()), 1 + factor)

    with torch.enable_grad():
        for step in range(iterations):
            weights = {layer.parameter: layer.stored(value(index)) for index, layer in enumerate(layers)}
            one = order[step % len(order)]
            loss = torch.nn.functional.mse_loss(_output(block, weights, inputs[one]).float(), targets[one].float())
            grads = torch.autograd.grad(loss, [tensor for tensor, _ in trained])
            rate = learning_rate * (1 - step / iterations)
            with torch.no_grad():
                for (tensor, bound), grad in zip(trained, grads, strict=True):
                    tensor.sub_(rate * torch.sign(grad)).clamp_(-bound, bound)
    with torch.no_grad():
        tuned = [rounded(index) for index in range(len(layers))]
        kept = [None if factor is None else 1 + factor.detach() for factor in factors]
        error, outputs = (
            _error(block, _weights(layers, tuned, kept), inputs, targets) if iterations else (start_error, [])
        )
    if error >= start_error:
        tuned, kept, error, outputs = start, untouched, start_error, start_outputs
    fell_back = False
    if fallback is not None:
        with torch.no_grad():
            other = [layer.codes for layer in fallback]
            other_error, other_outputs = _error(block, _weights(fallback, other, untouched), inputs, targets)
        if other_error < error:
            tuned, kept, error, outputs, fell_back = other, untouched, other_error, other_outputs, True
    codes = {layer.parameter: codes for layer, codes in zip(layers, tuned, strict=True)}
    return Tuned(codes, dict(zip(codes, kept, strict=True)), start_error, error, outputs, fell_back)
