"""GPTAQ's part of the GPTQ solver (Li et al. 2025, "asymmetric calibration"; :mod:`quantcli.quant.gptq_solver`).

GPTQ matches each layer's output on the quantized model's inputs ``X``; GPTAQ matches the full-precision
model's ``W X̃`` instead, with the cross term ``cross = 2/n·(X̃ - X)ᵀX`` collected beside the Hessian
``H = 2/n·XᵀX`` (:class:`quantcli.quant.reference.Reference`). When a column is rounded, the columns
not yet quantized also move by its weights times ``P = ASYMMETRY · triu₁(cross · Uᵀ) · U`` (``U`` the
upper Cholesky factor of ``H⁻¹`` in visiting order): the reference implementation's update, its alpha
included. The clip search then scores rows by ``||w X̃ - ŵ X||²`` rather than ``||(w - ŵ) X||²``.
"""

from __future__ import annotations

import torch

ASYMMETRY = 0.25  # GPTAQ's alpha: the weight of the asymmetry term (the reference implementation's default)


def asymmetry_update(
    cross: torch.Tensor | None, dead: torch.Tensor, order: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``P`` in visiting ``order``, and ``cross`` (float32, plain order) with its unseen (``dead``) columns
    zeroed; ``(None, None)`` without ``cross``."""
    if cross is None:
        return None, None
    cross = cross.detach().float().clone()
    cross[:, dead] = 0
    return ASYMMETRY * (cross[order][:, order] @ upper.t()).triu_(diagonal=1) @ upper, cross


def target_error(
    weights: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor | None
) -> torch.Tensor:
    """Each row's output error against its target, up to a constant: ``e H eᵀ`` (``e = w - ŵ``), plus with
    GPTAQ's ``cross`` the term ``2·ASYMMETRY·e·(w cross)`` of ``||w X̃ - ŵ X||²`` that depends on ``ŵ``."""
    error = weights - rounded
    loss = ((error @ hessian) * error).sum(dim=1)
    return loss if cross is None else loss + 2 * ASYMMETRY * (error * (weights @ cross)).sum(dim=1)
