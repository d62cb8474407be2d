"""How much each tensor's rounding costs, measured on the model rather than guessed.

The proxy for one layer and candidate is the Fisher-weighted output error
``¼ Σ_r G_r · e_r H e_rᵀ`` (nats/token): ``e_r`` is output row ``r`` of the weight error, ``H = 2/n·XᵀX``
the layer's input Hessian on calibration text (the one GPTQ uses, taken once on the unquantized
model and shared by every candidate), and ``G_r`` the mean squared gradient of the loss with respect
to output ``r``, labels sampled from the model itself (the diagonal of the Fisher information at the
layer's output). For small errors the KL divergence from the original model is ``½ δᵀ F δ``, which
this approximates layer by layer. :func:`measured_kl` measures the real KL with one layer changed, which
:mod:`quantcli.allocate.search` uses to validate the proxy's ranking and fit its one global scale.
"""

from __future__ import annotations

from typing import Any

import torch

from quantcli.quant.blockwise import ModelBlocks, quantize_blockwise
from quantcli.quant.layers import weight_matrix

BATCH = 8  # windows per forward pass


def hessians(model: Any, names: tuple[str, ...], calibration: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Each layer's ``2/n·XᵀX`` on ``calibration`` through the unquantized model (layers sharing an
    input share one tensor); None for a layer no calibration pass reaches."""
    found: dict[str, torch.Tensor | None] = {}
    last: list[torch.Tensor | None] = [None]

    def keep(name: str, hessian: torch.Tensor | None) -> None:
        if (
            hessian is not None
            and last[0] is not None
            and last[0].shape == hessian.shape
            and torch.equal(last[0], hessian)
        ):
            hessian = last[0]
        found[name] = last[0] = hessian

    quantize_blockwise(ModelBlocks(model, names), names, calibration, keep)
    return found


def output_fisher(
    model: Any, names: tuple[str, ...], windows: torch.Tensor, seed: int, batch: int = BATCH
) -> dict[str, torch.Tensor]:
    """Per layer, the mean over tokens of the squared gradient of ``-log p(y)`` with respect to each
    output, ``y`` drawn from the model's own next-token distribution (seeded)."""
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(weight_matrix(modules[name]).shape[0]) for name in names}
    tokens = [0]
    generator = torch.Generator().manual_seed(seed)

    def forward_hook(name: str) -> Any:
        def accumulate(grad: torch.Tensor) -> None:
            sums[name].add_(grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(0).cpu())

        def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    def embedding_hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_()

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [modules[name].register_forward_hook(forward_hook(name)) for name in names]
    handles.append(model.get_input_embeddings().register_forward_hook(embedding_hook))
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for chunk in windows.split(batch):
                logits = model(input_ids=chunk.to(next(model.parameters()).device), use_cache=False).logits.float()
                log_p = torch.log_softmax(logits, dim=-1)
                labels = torch.multinomial(
                    log_p.detach().exp().reshape(-1, log_p.shape[-1]).cpu(), 1, generator=generator
                )
                (-log_p.reshape(-1, log_p.shape[-1]).gather(-1, labels.to(log_p.device))).sum().backward()
                tokens[0] += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: total / tokens[0] for name, total in sums.items()}


def proxy(error: torch.Tensor, hessian: torch.Tensor | None, fisher: torch.Tensor) -> float:
    """``¼ Σ_r G_r · e_r H e_rᵀ`` for a weight error ``error`` (``[out, in]``); without a Hessian,
    ``H`` is taken as the identity (no calibration pass reached the layer)."""
    error = error.float()
    rows = (error * error).sum(1) if hessian is None else ((error @ hessian) * error).sum(1)
    return 0.25 * float((fisher.to(rows.device) * rows).sum())


def base_log_probs(model: Any, windows: torch.Tensor, batch: int = BATCH) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on each mini-batch of ``windows`` (the KL reference)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return [
            torch.log_softmax(model(input_ids=c.to(device), use_cache=False).logits.float(), dim=-1)
            for c in windows.split(batch)
        ]


def measured_kl(model: Any, windows: torch.Tensor, reference: list[torch.Tensor], batch: int = BATCH) -> float:
    """Mean KL(reference || model) per token on ``windows`` (nats)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk, log_p in zip(windows.split(batch), reference):
            log_q = torch.log_softmax(model(input_ids=chunk.to(device), use_cache=False).logits.float(), dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += chunk.numel()
    return total / count


def spearman(first: list[float], second: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> torch.Tensor:
        data = torch.tensor(values, dtype=torch.float64)
        order = data.argsort()
        rank = torch.empty_like(data)
        rank[order] = torch.arange(len(values), dtype=torch.float64)
        for value in data.unique():  # ties share their mean rank
            tied = data == value
            rank[tied] = rank[tied].mean()
        return rank

    a, b = ranks(first), ranks(second)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator else 0.0
