"""Round-to-nearest: pure-PyTorch INT8/INT4/INT3 weight quantization that runs wherever torch does.

INT8 defaults to symmetric per-channel, INT4/INT3 to symmetric groups of 32 (``--asymmetric`` adds
zero points). Written as a compressed-tensors checkpoint (``pack-quantized``; ``int-quantized``
for W8A8, see :func:`quantcli.formats.compressed_tensors.scheme.storage_kind`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from quantcli.formats.compressed_tensors.writer import compressed_result
from quantcli.formats.gguf.types import round_to_nearest as round_to_block
from quantcli.formats.gguf.writer import quantize_on_grid
from quantcli.methods import register_method
from quantcli.methods.base import Quantizer
from quantcli.quant import ops
from quantcli.quant.blockwise import quantize_blockwise
from quantcli.quant.intgrid import TABLE_NOTE, IntGridConfig, IntLayout, IntWeights, request_layouts
from quantcli.quant.layers import set_weight_matrix, weight_matrix
from quantcli.quant.records import QuantizedModel, QuantizeRequest

if TYPE_CHECKING:
    import torch


def rounding_step(request: QuantizeRequest, plan: dict[str, IntLayout]) -> Callable[..., IntWeights]:
    """The block driver's per-layer step that rounds a layer to nearest on its layout, in place (the
    Hessian, if the driver collects one, is not used)."""
    modules = dict(request.model.named_modules())

    def finish(name: str, *unused: object) -> IntWeights:
        layer = round_to_nearest(weight_matrix(modules[name]), plan[name])
        dequantized = ops.dequantize(layer.q, layer.scale, layer.zero_point, layer.layout.group_size)
        set_weight_matrix(modules[name], dequantized)
        request.progress(1)
        return layer

    return finish


def table_notes(request: QuantizeRequest, plan: dict[str, IntLayout]) -> dict[str, list[str]]:
    """Every layer's notes, the input embedding's and output head's saying they were rounded to nearest."""
    notes: dict[str, list[str]] = {name: [] for name in plan}
    for name in request.tables:
        unit = "row" if plan[name].group_size is None else f"group of {plan[name].group_size}"
        notes[name].append(TABLE_NOTE.format(unit=unit))
    return notes


class RTNConfig(IntGridConfig):
    """RTN has no options beyond the shared integer grid."""


@register_method
class RTNQuantizer(Quantizer):
    name = "rtn"
    summary = "round-to-nearest, pure PyTorch (INT8 per-channel, INT4/INT3 group-wise); compressed-tensors output"
    supported_bits = (8, 4, 3)
    config_class = RTNConfig
    quantizes_tables = True
    output_format = "compressed-tensors"
    block_grids = True
    streams = True
    allocates = True
    default_for = ((8, "cpu"), (4, "cpu"))
    run_options = ("embeddings", "keep_dtype")

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:

        if request.grid is not None:
            return self._on_grid(request)
        plan = request_layouts(request)
        blocks = request.block_source(tuple(plan))
        quantize_blockwise(blocks, tuple(plan), None, rounding_step(request, plan))
        config = request.config
        notes = table_notes(request, plan)
        return compressed_result(request.model, self.name, config.bits, config.grid_options(), blocks.records, notes)

    def _on_grid(self, request: QuantizeRequest) -> QuantizedModel:
        """llama.cpp's own reference rounding onto the request's GGUF block type, layer by layer."""

        return quantize_on_grid(
            request,
            self.name,
            {"gguf_type": request.grid.name},
            lambda matrix, hessian, kind, name: (round_to_block(matrix, kind), []),
        )


def round_to_nearest(matrix: torch.Tensor, layout: IntLayout) -> IntWeights:
    """One ``[out, in]`` weight's integers, scales and zero points on ``layout``'s grid, rounded to nearest."""
    scale, zero_point = ops.compute_qparams(
        matrix, layout.bits, layout.symmetric, layout.group_size, layout.observer, layout.scale_dtype_for(matrix.dtype)
    )
    return IntWeights(
        ops.quantize(matrix, scale, zero_point, layout.bits, layout.group_size), scale, zero_point, layout
    )
