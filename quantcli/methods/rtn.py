"""Round-to-nearest: pure-PyTorch INT8/INT4 weight quantization that runs wherever torch does.

INT8 defaults to symmetric per-channel, INT4 to symmetric groups of 64 (``--asymmetric`` adds zero
points). Written
as a compressed-tensors checkpoint (``int-quantized`` for 8 bits, ``pack-quantized`` below).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcli import ops
from quantcli.intweights import IntWeights, check_observer, plan_layouts, resolve_group_size
from quantcli.methods import register_method
from quantcli.methods.base import QuantizedModel, QuantizeRequest, Quantizer
from quantcli.models import set_weight_matrix, weight_matrix


@dataclass(frozen=True)
class RTNConfig:
    bits: int
    group_size: int | None = None
    symmetric: bool | None = None
    observer: str = "minmax"

    def __post_init__(self) -> None:
        check_observer(self.observer)
        object.__setattr__(self, "group_size", resolve_group_size(self.group_size, self.bits))
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", True)


@register_method
class RTNQuantizer(Quantizer):
    name = "rtn"
    summary = "round-to-nearest, pure PyTorch (INT8 per-channel, INT4 group-wise); compressed-tensors output"
    supported_bits = (8, 4)
    config_class = RTNConfig
    output_format = "compressed-tensors"

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        from quantcli.blockwise import quantize_blockwise
        from quantcli.formats.compressed_tensors import compressed_result

        config = request.config
        model = request.model
        modules = dict(model.named_modules())
        plan = plan_layouts(model, request.layers, config.bits, config.symmetric, config.group_size, config.observer)

        def finish(name: str, hessian: None) -> IntWeights:
            layout, matrix = plan[name][0], weight_matrix(modules[name])
            scale, zero_point = ops.compute_qparams(matrix, layout.bits, layout.symmetric, layout.group_size, layout.observer)
            q = ops.quantize(matrix, scale, zero_point, layout.bits, layout.group_size)
            set_weight_matrix(modules[name], ops.dequantize(q, scale, zero_point, layout.group_size))
            request.progress(1)
            return IntWeights(q, scale, zero_point, layout)

        blocks = request.block_source(tuple(plan))
        quantize_blockwise(blocks, tuple(plan), None, finish)
        options = {"group_size": config.group_size, "symmetric": config.symmetric, "observer": config.observer}
        notes = {name: [note] if note else [] for name, (_, note) in plan.items()}
        return compressed_result(model, self.name, config.bits, options, blocks.records, notes)
