"""NaN and inf never reach a checkpoint or a report: weights so large that their quantization scale
overflows are refused before quantizing (naming the layer and the way out), a quantized model that
holds NaN/inf is refused before saving, and a model whose logits are not finite has no perplexity."""

from __future__ import annotations

import math
from typing import Any

from quantcli.errors import ModelLoadError, option
from quantcli.quant.layers import weight_matrix

SCALE_LIMIT = 1e30  # |weight| above this makes (max - min) / levels or its products overflow float32


def check_weight_range(name: str, weight: Any, source: str) -> None:
    """Refuse a layer whose values are too large for a finite quantization scale."""
    values = weight.detach()
    if values.device.type == "meta" or not values.is_floating_point() or values.numel() == 0:
        return
    peak = values.abs().amax().float().item()
    spread = (values.amax().float() - values.amin().float()).item()
    if not math.isfinite(spread) or peak > SCALE_LIMIT:
        raise ModelLoadError(
            f"{source + ': ' if source else ''}layer {name} has weights up to {peak:.3g} in magnitude; its "
            "quantization scale would overflow"
            f" to inf and the checkpoint would hold NaN. Keep it in full precision with {option('skip_modules')} "
            f"'{name}', or fix the checkpoint."
        )


def check_layers_quantizable(model: Any, names: tuple[str, ...], source: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        check_weight_range(name, weight_matrix(modules[name]), source)


def check_model_finite(model: Any, what: str) -> None:
    """Every floating tensor of ``model`` is finite (a last guard before anything is written)."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            raise ModelLoadError(
                f"{what}: {name} holds NaN/inf after quantization; nothing was written. Keep that layer in full "
                f"precision with {option('skip_modules')}."
            )


def check_perplexity_finite(perplexity: float, label: str) -> None:
    if not math.isfinite(perplexity):
        model = {"original": "the original model", "quantized": "the quantized model"}.get(label, "the model")
        raise ModelLoadError(
            f"{model} gives non-finite logits (NaN/inf) on the evaluation text, so it has no perplexity."
            " Its weights or activations overflow: check the checkpoint's weights."
        )
