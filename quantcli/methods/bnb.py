"""bitsandbytes through transformers' own integration: LLM.int8 (``bnb-int8``) and 4-bit NF4/FP4
(``bnb-nf4``, ``bnb-fp4``). Checkpoints are transformers' bitsandbytes serialisation, so a plain
``from_pretrained(DIR)`` with bitsandbytes installed loads them.

bitsandbytes' CPU 4-bit kernel (taken on CPUs with AVX512-BF16) needs ``out_features % 32 == 0``
and ``in_features % 64 == 0``; elsewhere it raises at the first forward ("N must be divisible by
block_n"). Each layer shape is probed once on the target device with a throwaway layer, and a
layer that fails is kept in full precision and reported, never silently dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantcli.errors import InputError, UnavailableError, option
from quantcli.formats.bitsandbytes import BLOCK
from quantcli.methods import register_method
from quantcli.methods.base import Quantizer
from quantcli.quant.layers import is_conv1d
from quantcli.quant.records import LayerRecord, QuantizedModel, QuantizeRequest
from quantcli.sources.models import load_model


@dataclass(frozen=True)
class Int8Config:
    bits: int
    threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise InputError(f"threshold must be >= 0 (outlier magnitude kept in fp16), got {self.threshold}.")


@dataclass(frozen=True)
class FourBitConfig:
    bits: int
    double_quant: bool = False


@functools.cache
def probe_4bit(
    in_features: int, out_features: int, quant_type: str, dtype_name: str, device: str, double_quant: bool
) -> str | None:
    """Why bitsandbytes' 4-bit layer of this shape fails on ``device`` (raises or computes wrong), or None."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    try:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=False,
            compute_dtype=dtype,
            quant_type=quant_type,
            compress_statistics=double_quant,
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant, module=layer
        )
        layer = layer.to(device).eval()
        reference_weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        inputs = torch.randn(3, in_features, generator=generator).to(device=device, dtype=dtype)
        with torch.no_grad():
            output = layer(inputs).float()
        expected = inputs.float() @ reference_weight.T
    except (AssertionError, RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {str(error).strip() or 'assertion failed in the kernel'}"
    relative = ((output - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not torch.isfinite(output).all() or relative > 2e-2:
        return f"wrong results (relative error {relative:.3g})"
    return None


def _features(module: Any) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def bitsandbytes_missing() -> str | None:
    """Why bitsandbytes cannot be used here, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        return f"bitsandbytes does not import ({error}); use {option('method', 'rtn')}"
    return None


def fourbit_quantization_config(quant_type: str, double_quant: bool, dtype: Any, skip: list[str]) -> Any:
    """transformers' BitsAndBytesConfig for 4-bit ``quant_type``, leaving ``skip`` in full precision."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=skip,
    )


def fourbit_fallbacks(request: QuantizeRequest, quant_type: str, double_quant: bool) -> dict[str, str]:
    """The selected layers bitsandbytes' 4-bit kernel cannot run on the request's device, with why."""
    modules = dict(request.model.named_modules())
    dtype = str(request.dtype).removeprefix("torch.")
    reasons = {}
    for name in request.layers:
        in_features, out_features = _features(modules[name])
        why = probe_4bit(in_features, out_features, quant_type, dtype, request.device, double_quant)
        if why:
            reasons[name] = f"bitsandbytes 4-bit fails for {out_features}x{in_features} on {request.device}: {why}"
    return reasons


def split_layers(request: QuantizeRequest, fallbacks: dict[str, str], method: str) -> list[str]:
    """The layers bitsandbytes will quantize: the selection minus ``fallbacks``; none at all is an error."""
    chosen = [name for name in request.layers if name not in fallbacks]
    if not chosen:
        first = next(iter(fallbacks.values()))
        raise UnavailableError(
            f"bitsandbytes {method} fails for every selected layer on {request.device} ({first}). Use "
            f"{option('method', 'rtn')}."
        )
    return chosen


def kept_linears(model: Any, chosen: list[str]) -> list[str]:
    """The Linear/Conv1D layers bitsandbytes must leave in full precision."""
    import torch

    quantizable = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)]
    return [name for name in quantizable if name not in chosen]


def load_quantized(request: QuantizeRequest, quantization_config: Any) -> Any:
    """Reload the source through transformers' bitsandbytes integration with ``quantization_config``.

    Frees ``request.model`` first, so two copies of the weights never coexist after loading.
    """
    request.model = None
    return load_model(
        request.source,
        request.dtype,
        request.placement,
        request.trust_remote_code,
        quantization_config=quantization_config,
    )


def fourbit_record(module: Any, quant_type: str) -> LayerRecord:
    state = getattr(module.weight, "quant_state", None)  # none on a streamed (meta) skeleton: written with BLOCK
    blocksize = state.blocksize if state is not None else BLOCK
    return LayerRecord(4, quant_type, blocksize, (module.out_features, module.in_features))


def build_result(
    request: QuantizeRequest,
    model: Any,
    method: str,
    chosen: list[str],
    fallbacks: dict[str, str],
    record: Callable[[Any], LayerRecord],
    notes: dict[str, str | None] | None = None,
    stats: dict[str, Any] | None = None,
) -> QuantizedModel:
    """Per-layer records (kept layers with the kernel's reason) and the transformers-native save."""
    kept_dtype = str(request.dtype).removeprefix("torch.")
    layers: dict[str, LayerRecord] = {}
    for name, module in model.named_modules():
        if name in chosen:
            layers[name] = record(module)
            layers[name].note = (notes or {}).get(name)
        elif name in fallbacks:
            shape = tuple(module.weight.shape)
            layers[name] = LayerRecord(
                16 if kept_dtype != "float32" else 32,
                kept_dtype,
                None,
                shape,
                f"kept in {kept_dtype}: {fallbacks[name]}",
            )
            request.progress(1)
    options = {key: value for key, value in vars(request.config).items() if key != "bits"}
    return QuantizedModel(model, method, request.config.bits, "bitsandbytes", options, layers, stats=stats or {})


class _Bitsandbytes(Quantizer):
    """bitsandbytes through transformers: reload the source with a BitsAndBytesConfig."""

    output_format = "bitsandbytes"

    def unavailable_reason(self, device: str) -> str | None:
        return bitsandbytes_missing()

    def quantization_config(self, config: Any, dtype: Any, skip: list[str]) -> Any:
        raise NotImplementedError

    def fallbacks(self, request: QuantizeRequest) -> dict[str, str]:
        return {}

    def record(self, module: Any) -> LayerRecord:
        raise NotImplementedError

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        fallbacks = self.fallbacks(request)
        chosen = split_layers(request, fallbacks, self.name)
        config = self.quantization_config(request.config, request.dtype, kept_linears(request.model, chosen))
        model = load_quantized(request, config)
        request.progress(len(chosen))
        return build_result(request, model, self.name, chosen, fallbacks, self.record)


@register_method
class BnbInt8(_Bitsandbytes):
    name = "bnb-int8"
    summary = "bitsandbytes LLM.int8 (int8 weights, fp16 outliers); transformers-native checkpoint"
    supported_bits = (8,)
    config_class = Int8Config
    default_for = ((8, "cuda"),)

    def quantization_config(self, config: Int8Config, dtype: Any, skip: list[str]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.threshold, llm_int8_skip_modules=skip)

    def record(self, module: Any) -> LayerRecord:
        return LayerRecord(8, "llm.int8 per-row", None, tuple(module.weight.shape))


class _FourBit(_Bitsandbytes):
    supported_bits = (4,)
    config_class = FourBitConfig
    quant_type: str

    def quantization_config(self, config: FourBitConfig, dtype: Any, skip: list[str]) -> Any:
        return fourbit_quantization_config(self.quant_type, config.double_quant, dtype, skip)

    def fallbacks(self, request: QuantizeRequest) -> dict[str, str]:
        return fourbit_fallbacks(request, self.quant_type, request.config.double_quant)

    def record(self, module: Any) -> LayerRecord:
        return fourbit_record(module, self.quant_type)


@register_method
class BnbNF4(_FourBit):
    name = "bnb-nf4"
    default_for = ((4, "cuda"),)
    summary = "bitsandbytes 4-bit NormalFloat (QLoRA), optional double quant; transformers-native checkpoint"
    quant_type = "nf4"


@register_method
class BnbFP4(_FourBit):
    name = "bnb-fp4"
    summary = "bitsandbytes 4-bit float, optional double quant; transformers-native checkpoint"
    quant_type = "fp4"
