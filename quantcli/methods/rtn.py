"""Round-to-nearest: pure-PyTorch INT8/INT4 weight quantization that runs wherever torch does.

INT8 defaults to symmetric per-channel, INT4 to symmetric groups of 64 (``--asymmetric`` adds zero
points). Written
as a compressed-tensors checkpoint (``int-quantized`` for 8 bits, ``pack-quantized`` below).
"""

from __future__ import annotations

from quantcli import ops
from quantcli.intweights import IntGridConfig, IntWeights, plan_layouts
from quantcli.methods import register_method
from quantcli.methods.base import QuantizedModel, QuantizeRequest, Quantizer
from quantcli.models import set_weight_matrix, weight_matrix


class RTNConfig(IntGridConfig):
    """RTN has no options beyond the shared integer grid."""


@register_method
class RTNQuantizer(Quantizer):
    name = "rtn"
    summary = "round-to-nearest, pure PyTorch (INT8 per-channel, INT4 group-wise); compressed-tensors output"
    supported_bits = (8, 4)
    config_class = RTNConfig
    output_format = "compressed-tensors"
    block_grids = True

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        from quantcli.blockwise import quantize_blockwise
        from quantcli.formats.compressed_tensors import compressed_result

        config = request.config
        model = request.model
        modules = dict(model.named_modules())
        if request.grid is not None:
            return self._on_grid(request)
        plan = plan_layouts(model, request.layers, config.bits, config.symmetric, config.group_size, config.observer)

        def finish(name: str, hessian: None) -> IntWeights:
            layout, matrix = plan[name], weight_matrix(modules[name])
            scale, zero_point = ops.compute_qparams(matrix, layout.bits, layout.symmetric, layout.group_size, layout.observer)
            q = ops.quantize(matrix, scale, zero_point, layout.bits, layout.group_size)
            set_weight_matrix(modules[name], ops.dequantize(q, scale, zero_point, layout.group_size))
            request.progress(1)
            return IntWeights(q, scale, zero_point, layout)

        blocks = request.block_source(tuple(plan))
        quantize_blockwise(blocks, tuple(plan), None, finish)
        options = config.grid_options()
        notes = {name: [] for name in plan}
        return compressed_result(model, self.name, config.bits, options, blocks.records, notes)

    def _on_grid(self, request: QuantizeRequest) -> QuantizedModel:
        """llama.cpp's own reference rounding onto the request's GGUF block type, layer by layer."""
        from quantcli.formats.gguf import quantize_on_grid
        from quantcli.formats.gguf_grid import round_to_nearest

        return quantize_on_grid(request, self.name, {"gguf_type": request.grid.name}, lambda matrix, hessian: (round_to_nearest(matrix, request.grid), []))
