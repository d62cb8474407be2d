"""GPTQ on bitsandbytes' NF4 grid (``gptq-nf4``), written as an ordinary bitsandbytes 4-bit checkpoint.

bitsandbytes stores a 4-bit weight as blocks of 64 consecutive values (row-major), each with an
fp32 absmax, every value one of the 16 NF4 codes times its block's absmax. When ``in_features`` is a
multiple of 64 a block is a group of 64 inputs of one row, so GPTQ's error feedback
(:func:`gptq_quantize` with the NF4 codebook and static groups) can choose the codes, and the
result is packed into bitsandbytes' own tensors: plain transformers + bitsandbytes load it with no
quantcli installed. Other layers (blocks spanning rows, e.g. stories260K's 172-wide ``down_proj``)
keep bitsandbytes' own rounding; layers its CPU kernel cannot run stay in full precision. Both are
reported per layer. No double quant: GPTQ picks codes against exact fp32 absmax values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantcli.errors import InputError
from quantcli.formats.bitsandbytes import BLOCK, NF4Weights, pack_nf4
from quantcli.methods import register_method
from quantcli.methods.base import Quantizer
from quantcli.methods.bnb import (
    bitsandbytes_missing,
    build_result,
    fourbit_fallbacks,
    fourbit_quantization_config,
    fourbit_record,
    kept_linears,
    load_quantized,
    split_layers,
)
from quantcli.quant import ops
from quantcli.quant.blockwise import quantize_blockwise
from quantcli.quant.gptq_solver import gptq_quantize
from quantcli.quant.intgrid import IntLayout
from quantcli.quant.layers import set_weight_matrix, weight_matrix
from quantcli.quant.records import QuantizedModel, QuantizeRequest
from quantcli.quant.reference import Reference


@dataclass(frozen=True)
class GPTQNF4Config:
    bits: int
    act_order: bool = True
    double_quant: ClassVar[bool] = False  # GPTQ picks codes against exact fp32 absmax values
    damp: float = 0.01
    block_size: int = 128
    refit_scales: bool = False  # refit each block's absmax by least squares once the codes are fixed (gptq's option)

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise InputError(
                f"gptq-nf4 damp must be between 0 and 1 (a fraction of the mean Hessian diagonal), got {self.damp}. "
                "Use e.g. 0.01."
            )
        if self.block_size <= 0:
            raise InputError(
                f"gptq-nf4 block_size must be a positive number of columns, got {self.block_size}. Use e.g. 128."
            )


def _bitsandbytes_rounding(matrix: torch.Tensor) -> tuple[torch.Tensor, NF4Weights]:
    """What bitsandbytes' own NF4 quantization makes of ``matrix`` (blocks over the flat weight), and its codes."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(matrix.float().contiguous().cpu(), blocksize=BLOCK, quant_type="nf4")
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(matrix.shape)
    return F.dequantize_4bit(packed, state).to(matrix.device), NF4Weights(codes, state.absmax.reshape(-1))


@register_method
class GPTQNF4Quantizer(Quantizer):
    """bnb-nf4's steps (kernel probe, transformers reload, records) as functions, GPTQ choosing the codes."""

    name = "gptq-nf4"
    summary = "GPTQ error feedback on bitsandbytes' NF4 grid; transformers-native bitsandbytes checkpoint"
    supported_bits = (4,)
    config_class = GPTQNF4Config
    needs_calibration = True
    output_format = "bitsandbytes"
    streams = True

    def unavailable_reason(self, device: str) -> str | None:
        return bitsandbytes_missing()

    def solve(self, config: Any, name: str, solve: Callable, hessian: torch.Tensor, cross: object) -> tuple:
        """Layer ``name``'s ``(record, notes)`` from ``solve(hessian, cross)``, as :meth:`GPTQQuantizer.solve`."""
        return solve(hessian, cross)

    def reference(self, request: QuantizeRequest) -> Reference | None:
        """The full-precision stream a subclass's per-block step needs (:mod:`quantcli.methods.blockround`)."""
        return None

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        import bitsandbytes.functional as F

        config, model = request.config, request.model
        if request.calibration is None:
            raise InputError("gptq-nf4 needs calibration data: pass calibration token windows in the request.")
        kept = fourbit_fallbacks(request, "nf4", config.double_quant)
        chosen = split_layers(request, kept, self.name)
        quantization_config = fourbit_quantization_config(
            "nf4", config.double_quant, request.dtype, kept_linears(model, chosen)
        )
        nf4_record = lambda module: fourbit_record(module, "nf4")  # noqa: E731
        modules = dict(model.named_modules())
        codebook = F.get_4bit_type("nf4", device="cpu")
        codes: dict[str, NF4Weights] = {}
        notes: dict[str, str | None] = {}

        def finish(name: str, hessian: torch.Tensor | None) -> NF4Weights:
            module, matrix = modules[name], weight_matrix(modules[name])
            if matrix.shape[1] % BLOCK:
                notes[name] = (
                    f"bitsandbytes NF4 rounding without GPTQ: its blocks of {BLOCK} span rows as in_features "
                    f"{matrix.shape[1]} is not a multiple"
                )
                rounded, record = _bitsandbytes_rounding(matrix)
                set_weight_matrix(module, rounded)
            else:
                if hessian is None:
                    hessian = torch.zeros(matrix.shape[1], matrix.shape[1], device=matrix.device)
                layer, extra = self.solve(
                    config,
                    name,
                    lambda hessian, _: gptq_quantize(
                        matrix,
                        hessian,
                        IntLayout(4, True, BLOCK),
                        config.damp,
                        config.block_size,
                        config.act_order,
                        codebook.to(matrix.device),
                        refit=config.refit_scales,
                    ),
                    hessian,
                    None,
                )
                notes[name] = "; ".join(extra) or None
                absmax = layer.scale.float()
                record = NF4Weights(layer.q.to(torch.uint8).cpu(), absmax.cpu())
                codes[name] = record
                set_weight_matrix(
                    module,
                    ops.dequantize_codebook(
                        layer.q, absmax.repeat_interleave(BLOCK, dim=1), codebook.to(matrix.device)
                    ),
                )
            request.progress(1)
            return record

        blocks = request.block_source(tuple(chosen))
        stats = quantize_blockwise(
            blocks, tuple(chosen), request.calibration, finish, reference=self.reference(request)
        )
        if (
            request.blocks is not None
        ):  # streamed: every block is written already; config.json gets bitsandbytes' config
            model.config.quantization_config = quantization_config
            return build_result(request, model, self.name, chosen, kept, nf4_record, notes, stats)
        model = modules = None
        packed_model = load_quantized(request, quantization_config)
        packed_modules = dict(packed_model.named_modules())
        for name in codes:
            record, weight = blocks.records[name], packed_modules[name].weight  # as a per-block step left it
            weight.data = pack_nf4(record.codes).to(weight.device)
            weight.quant_state.absmax = record.absmax.reshape(-1).to(weight.device)
        return build_result(request, packed_model, self.name, chosen, kept, nf4_record, notes, stats)
