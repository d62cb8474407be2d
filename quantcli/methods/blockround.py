"""``blockround``: GPTQ, then each decoder block's rounding tuned together to reproduce the full-precision block.

GPTQ chooses every layer's codes one layer at a time, each against its own output. Once a block's layers
are done, :func:`quantcli.quant.round_tuning.tune_block` lets each code move one step on the layer's fixed
grid, by signed gradient descent on the block's output error against the original block's outputs on the
full-precision stream (the driver carries both streams, :class:`quantcli.quant.reference.Reference`),
and keeps the result only where the error on all calibration windows drops. Scales are GPTQ's (its clip
search included), so the grid is whatever the run writes: compressed-tensors integer groups (any width,
symmetric or not) or, with ``--format gguf``, the GGUF type's own blocks with llama.cpp's scales. Every
option of gptq applies (``target: full-precision`` composes: GPTAQ then tuning); streams and resumes as
gptq does. Cost: ``iterations`` forward and backward passes of one block on one calibration mini-batch,
plus two forward passes over all of them, per block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from quantcli.errors import InputError
from quantcli.methods import register_method
from quantcli.methods.gptq import GPTQConfig, GPTQQuantizer
from quantcli.quant import ops
from quantcli.quant.intgrid import IntWeights
from quantcli.quant.layers import is_conv1d, set_weight_matrix
from quantcli.quant.records import QuantizedModel, QuantizeRequest
from quantcli.quant.reference import Inputs, Reference
from quantcli.quant.round_tuning import TunableLayer, tune_block


@dataclass(frozen=True)
class BlockRoundConfig(GPTQConfig):
    """GPTQ's options plus the tuning's: ``iterations`` signed-gradient steps per block (0: plain GPTQ),
    the starting ``learning_rate`` in code steps (decaying linearly to zero; None: ``1 / iterations``,
    AutoRound's rule), and the ``seed`` that orders the calibration mini-batches."""

    iterations: int = 16
    learning_rate: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 0:
            raise InputError(
                f"blockround iterations must be 0 or more steps per block, got {self.iterations}. Use e.g. 16."
            )
        if self.learning_rate is not None and not 0 < self.learning_rate <= 1:
            raise InputError(
                f"blockround learning_rate must be above 0 and at most 1 (code steps), got {self.learning_rate}. "
                "Use e.g. 0.1."
            )


def _codes(record: Any) -> torch.Tensor:
    return record.q if isinstance(record, IntWeights) else record.codes


def _with_codes(record: Any, codes: torch.Tensor) -> Any:
    """The record with other codes, everything the format stores from the scales unchanged."""
    codes = codes.to(torch.int8)
    return replace(record, q=codes) if isinstance(record, IntWeights) else replace(record, codes=codes)


def _values(record: Any) -> torch.Tensor:
    """The fp32 ``[out, in]`` weights the format's runtime computes with."""
    if isinstance(record, IntWeights):
        return ops.dequantize(record.q, record.scale, record.zero_point, record.layout.group_size).float()
    return record.dequantize().float()


def _range(record: Any) -> tuple[int, int]:
    return (
        ops.int_range(record.layout.bits)
        if isinstance(record, IntWeights)
        else (record.type.lowest, record.type.highest)
    )


@register_method
class BlockRoundQuantizer(GPTQQuantizer):
    name = "blockround"
    summary = (
        "GPTQ, then each decoder block's rounding tuned by signed gradient descent to reproduce the"
        " full-precision block (integer groups or --format gguf)"
    )
    config_class = BlockRoundConfig
    default_for = ()

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        self._errors: list[tuple[float, float]] = []
        result = super().quantize(request)
        if self._errors:
            start, tuned = (sum(pair[i] for pair in self._errors) for i in (0, 1))
            result.stats["block_output_error"] = {"gptq": start, "tuned": tuned, "blocks": len(self._errors)}
        return result

    def _on_grid(self, request: QuantizeRequest) -> QuantizedModel:
        result = super()._on_grid(request)
        config = request.config
        result.options.update(iterations=config.iterations, learning_rate=config.learning_rate, seed=config.seed)
        return result

    def reference(self, request: QuantizeRequest) -> Reference:
        config = request.config
        modules = {module: name for name, module in request.model.named_modules()}

        def refine(block: torch.nn.Module, records: dict[str, Any], inputs: Inputs, targets: list) -> dict[str, Any]:
            originals = reference.originals
            inside = {
                modules[module]: (f"{name}.weight", module)
                for name, module in block.named_modules()
                if modules.get(module) in records and records[modules[module]] is not None
            }
            if not inside or not config.iterations:
                return records
            layers = [
                TunableLayer(
                    parameter,
                    _codes(records[name]).float(),
                    *_range(records[name]),
                    lambda codes, record=records[name]: _values(_with_codes(record, codes)),
                    originals[name],
                    is_conv1d(module),
                )
                for name, (parameter, module) in inside.items()
            ]
            rate = config.learning_rate or 1 / config.iterations
            tuned = tune_block(block, layers, inputs, targets, config.iterations, rate, config.seed)
            self._errors.append((tuned.start_error, tuned.error))
            for name, (parameter, module) in inside.items():
                records[name] = _with_codes(records[name], tuned.codes[parameter])
                set_weight_matrix(module, _values(records[name]).to(module.weight.dtype))
            return records

        reference = Reference(asymmetric=config.target == "full-precision", refine=refine)
        return reference
