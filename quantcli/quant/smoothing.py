"""SmoothQuant-style smoothing for W8A8 (``--smoothing ALPHA`` with ``--activations int8``; Xiao et al.
2023, as llm-compressor's ``SmoothQuantModifier`` applies it to Llama-style blocks).

A few input channels of a decoder block's linears carry activations far larger than the rest, so one
int8 scale per token spends its range on them. Each such input is the output of a norm whose weight
multiplies it channel by channel, so the model computes the same function when that weight is divided
by ``s_j`` and the columns ``j`` of every linear that reads the norm's output are multiplied by ``s_j``.
With ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``X_j``: channel ``j`` of the norm's output over
the calibration windows, ``W_j``: column ``j`` of the linears) the activation outliers move into the
weights, which are quantized per output channel and take them better. Pairs smoothed: each block's
``input_layernorm`` with ``self_attn.q/k/v_proj`` and ``post_attention_layernorm`` with
``mlp.gate/up_proj`` (the pairs llm-compressor maps for Llama, Mistral, Qwen2 and kin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, option

if TYPE_CHECKING:
    import torch

PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def check_smoothing(alpha: float | None, activations: str | None) -> None:
    if alpha is None:
        return
    if activations is None:
        raise InputError(
            f"{option('smoothing')} moves activation outliers into the weights for W8A8;"
            f" add {option('activations', 'int8')}."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(
            f"{option('smoothing')} is SmoothQuant's migration strength, between 0 and 1 (0.5 is usual), got {alpha!r}."
        )


def smoothing_pairs(model: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Each norm and the linears that read its output, as :data:`PAIRS` finds them in ``model``."""
    modules = dict(model.named_modules())
    pairs = []
    for name in modules:
        for norm, linears in PAIRS:
            if name == norm or name.endswith("." + norm):
                prefix = name[: -len(norm)]
                found = tuple(prefix + linear for linear in linears)
                if all(hasattr(modules.get(linear), "weight") for linear in found):
                    pairs.append((name, found))
    if not pairs:
        kind = type(model).__name__
        raise InputError(
            f"{option('smoothing')} knows Llama-style decoder blocks (input_layernorm -> self_attn.q/k/v_proj,"
            f" post_attention_layernorm -> mlp.gate/up_proj); {kind} has none. Drop {option('smoothing')}."
        )
    return pairs


def _activation_maxima(
    model: Any, norms: list[str], calibration: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """max |output| per channel of each norm over every calibration token."""
    import torch

    modules = dict(model.named_modules())
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: Any, args: Any, output: torch.Tensor) -> None:
            seen = output.detach().abs().float().reshape(-1, output.shape[-1]).amax(0)
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in norms]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, calibration.shape[0], batch_size):
                model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def fold_scales(producer: Any, consumers: list[Any], factors: torch.Tensor) -> None:
    """Divide each output channel ``j`` of ``producer`` (a norm's weight and bias, or a linear's output rows
    and bias) by ``factors[j]`` and multiply input column ``j`` of every ``consumers`` layer by it: when they
    alone read that output, the model computes the same function (SmoothQuant here, AWQ in
    :mod:`quantcli.quant.awq`)."""
    import torch

    from quantcli.quant.layers import set_weight_matrix, weight_matrix

    with torch.no_grad():
        if producer.weight.dim() == 1:
            producer.weight.copy_((producer.weight.float() / factors).to(producer.weight.dtype))
        else:
            set_weight_matrix(producer, weight_matrix(producer).float() / factors[:, None])
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_((producer.bias.float() / factors).to(producer.bias.dtype))
        for consumer in consumers:
            set_weight_matrix(consumer, weight_matrix(consumer).float() * factors)


def smooth(model: Any, calibration: torch.Tensor, alpha: float, batch_size: int = 8) -> dict[str, Any]:
    """Smooth ``model`` in place for W8A8 with strength ``alpha`` on ``calibration`` windows; returns
    what was done (pairs smoothed, the range of the factors)."""
    import torch

    pairs = smoothing_pairs(model)
    maxima = _activation_maxima(model, [norm for norm, _ in pairs], calibration, batch_size)
    modules = dict(model.named_modules())
    smallest, largest = float("inf"), 0.0
    with torch.no_grad():
        for norm_name, linear_names in pairs:
            norm, linears = modules[norm_name], [modules[name] for name in linear_names]
            columns = torch.cat([linear.weight.detach().abs().float() for linear in linears]).amax(0)
            factors = maxima[norm_name].clamp(min=1e-5).pow(alpha) / columns.clamp(min=1e-5).pow(1 - alpha)
            factors = factors.clamp(min=1e-5)
            fold_scales(norm, linears, factors)
            smallest, largest = min(smallest, factors.min().item()), max(largest, factors.max().item())
    return {
        "alpha": alpha,
        "pairs": len(pairs),
        "calibration_windows": int(calibration.shape[0]),
        "factor_range": [smallest, largest],
    }
