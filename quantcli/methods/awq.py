"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling folded into the operation before, then
round-to-nearest on the integer grid rtn and gptq share; compressed-tensors output.

Each decoder block is scaled (:mod:`quantcli.quant.awq`, on that block's calibration inputs, the earlier
blocks already quantized) and then its layers are rounded to nearest. The same scaling is a pre-step of GPTQ
(``-O awq=true``). The input embedding and output head are handled as rtn handles them.
"""

from __future__ import annotations

from quantcli.errors import InputError
from quantcli.formats.compressed_tensors.writer import compressed_result
from quantcli.methods import register_method
from quantcli.methods.base import Quantizer
from quantcli.methods.rtn import rounding_step, table_notes
from quantcli.quant.awq import awq_step
from quantcli.quant.blockwise import quantize_blockwise
from quantcli.quant.intgrid import IntGridConfig, request_layouts
from quantcli.quant.records import QuantizedModel, QuantizeRequest


class AWQConfig(IntGridConfig):
    """AWQ has no options beyond the shared integer grid (its ``α`` is searched per group of layers)."""


@register_method
class AWQQuantizer(Quantizer):
    name = "awq"
    summary = (
        "AWQ: activation-aware per-channel scales folded into the operation before, then round-to-nearest"
        " (INT8/INT4/INT3, groups); compressed-tensors output"
    )
    supported_bits = (8, 4, 3)
    config_class = AWQConfig
    needs_calibration = True
    quantizes_tables = True
    output_format = "compressed-tensors"
    streams = True
    run_options = ("embeddings", "keep_dtype")

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        config, model = request.config, request.model
        if request.calibration is None:
            raise InputError("awq needs calibration data: pass calibration token windows in the request.")
        plan = request_layouts(request)
        notes = table_notes(request, plan)
        blocks = request.block_source(tuple(plan))
        stats = quantize_blockwise(
            blocks,
            tuple(plan),
            request.calibration,
            rounding_step(request, plan),
            prepare_block=awq_step(model, plan, notes),
        )
        return compressed_result(model, self.name, config.bits, config.grid_options(), blocks.records, notes, stats)
