"""W8A8 (``--activations int8``): int8 weights per channel and each layer's inputs quantized to int8 at
run time, one scale per token (dynamic, symmetric), as vLLM's ``CompressedTensorsW8A8Int8`` computes
them (its CPU kernel ``CPUInt8ScaledMMLinearKernel``, its GPU ones likewise): ``scale = max|x| / 127``
per token, ``round(x / scale)`` saturated to int8, an integer product, rescaled by both scales.

quantcli's own evaluation and reload compute the same thing: :func:`attach` puts a forward pre-hook on
each such layer that replaces its input by ``round(x / scale) * scale`` (in float32, returned in the
input's dtype) before the layer multiplies it by its dequantized int8 weight, so quantcli's perplexity
is the served model's. The checkpoint says it with an ``input_activations`` entry in its scheme
(``{"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true, "symmetric": true}``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, option

if TYPE_CHECKING:
    import torch

ACTIVATIONS = ("int8",)
_MARK = "_quantcli_int8_inputs"


def check_activations(activations: str | None, bits: int, symmetric: bool, group_size: int | None) -> None:
    """Refuse a W8A8 request the int8 path cannot serve: 8-bit symmetric weights, one scale per channel."""
    if activations is None:
        return
    if activations not in ACTIVATIONS:
        raise InputError(f"{option('activations')} takes int8 (W8A8), got {activations!r}.")
    if bits != 8:
        raise InputError(
            f"{option('activations', 'int8')} quantizes 8-bit weights (W8A8); use {option('bits', 8)}, not {bits}."
        )
    if not symmetric:
        raise InputError(
            f"{option('activations', 'int8')} needs symmetric weights (vLLM's int8 kernels have no weight zero point);"
            f" drop {option('symmetric', False)}."
        )
    if group_size is not None:
        raise InputError(
            f"{option('activations', 'int8')} takes one weight scale per output channel (vLLM's W8A8 int8 schemes:"
            f" per channel or per tensor); drop {option('group_size')} or pass {option('group_size', -1)}."
        )


def quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to int8 with one symmetric scale per token (last dimension), dequantized."""
    import torch

    values = x.float()
    scale = values.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(values / scale), -128, 127) * scale).to(x.dtype)


def _hook(module: Any, args: tuple) -> tuple:
    return (quantize_tokens(args[0]), *args[1:])


def attach(model: Any, names: Iterable[str]) -> list[str]:
    """Quantize the inputs of the layers ``names`` of ``model`` per token from now on; returns the names."""
    modules = dict(model.named_modules())
    attached = []
    for name in names:
        module = modules[name]
        if not getattr(module, _MARK, False):
            module.register_forward_pre_hook(_hook)
            setattr(module, _MARK, True)
        attached.append(name)
    return attached


def quantized_input_layers(model: Any) -> list[str]:
    """The layers of ``model`` whose inputs :func:`attach` quantizes."""
    return [name for name, module in model.named_modules() if getattr(module, _MARK, False)]


def is_int8_token_dynamic(args: Any) -> bool:
    """Whether a compressed-tensors ``input_activations`` entry is what :func:`attach` computes."""
    if args is None:
        return False
    get = args.get if isinstance(args, dict) else lambda key: getattr(args, key, None)
    strategy = get("strategy")
    return (
        get("num_bits") == 8
        and str(get("type")).endswith("int")
        and bool(get("dynamic"))
        and get("symmetric") is not False
        and str(getattr(strategy, "value", strategy)) == "token"
    )


def quantize_inputs(quantized: Any, smoothed: dict[str, Any] | None) -> None:
    """W8A8: the layers whose inputs are quantized at run time get them quantized here too (so the
    perplexity measured next is the served model's); the smoothing done before goes into the stats."""
    layouts = {name: getattr(record, "layout", None) for name, record in quantized.records.items()}
    names = [name for name, layout in layouts.items() if getattr(layout, "activations", None)]
    if names:
        quantized.stats["activations"] = {"int8_per_token_dynamic": len(attach(quantized.model, names))}
    if smoothed is not None:
        quantized.stats["smoothing"] = smoothed
