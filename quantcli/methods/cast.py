"""``--bits 16``: cast the weights to float16 or bfloat16; the baseline every report compares against."""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.errors import InputError
from quantcli.methods import register_method
from quantcli.methods.base import Quantizer
from quantcli.quant.records import LayerRecord, QuantizedModel, QuantizeRequest
from quantcli.sources.models import load_model


@dataclass(frozen=True)
class CastConfig:
    bits: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "bfloat16"):
            raise InputError(f"cast dtype must be float16 or bfloat16, got {self.dtype!r}.")


@register_method
class CastQuantizer(Quantizer):
    name = "cast"
    summary = "16-bit float cast (fp16/bf16); the baseline"
    supported_bits = (16,)
    config_class = CastConfig
    output_format = "dense"
    default_for = ((16, "any"),)

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        import torch

        # Loaded at the target dtype (not model.to(dtype)), exactly as transformers reloads it:
        # .to() would also round buffers such as RoPE's inv_freq that loading keeps in float32.
        request.model = None
        model = load_model(
            request.source, getattr(torch, request.config.dtype), request.placement, request.trust_remote_code
        )
        layers = {name: LayerRecord(bits=16, scheme=request.config.dtype) for name in request.layers}
        request.progress(len(request.layers))
        return QuantizedModel(model, self.name, 16, self.output_format, {"dtype": request.config.dtype}, layers)
