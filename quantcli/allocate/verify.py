"""The verification pass: the allocated model measured against the original on text the search did
not fit to, with a confidence bound from the measurement itself.

A few thousand tokens of perplexity carry a large sampling error, and documents differ in how much
rounding hurts them, so the verification windows are spread evenly over the whole text (every
document it holds contributes) and a round counts as meeting a quality target only when the
*upper confidence bound* of its increase does: per window ``w`` the paired difference
``d_w = NLL_model(w) - NLL_original(w)`` (nats/token; KL likewise per window), then
``mean(d) + t(confidence, W-1) · sd(d) / sqrt(W)`` over the ``W`` windows (Student t).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import torch

from quantcli.allocate.sensitivity import BATCH, base_log_probs
from quantcli.errors import DatasetError
from quantcli.sources.datasets import token_sequences


def windows(source: Any, tokenizer: Any, tokens: int, seq_len: int, what: str) -> torch.Tensor:
    """``tokens // seq_len`` windows of ``seq_len`` tokens, non-overlapping and evenly spaced over
    the text's stream (its first 2^20 tokens), so they sample all of its documents, not the first few."""

    stream = token_sequences(source, tokenizer, "stream", "auto", max(1 << 20, tokens))[0]
    available = stream.numel() // seq_len
    if not available:
        raise DatasetError(
            f"{what} text {source.spec} has {stream.numel()} tokens, fewer than one window of {seq_len}. Use more text."
        )
    count = min(max(tokens // seq_len, 1), available)
    picked = [i * available // count for i in range(count)]
    return torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picked])


def t_quantile(confidence: float, freedom: int) -> float:
    """Student t's ``confidence`` quantile with ``freedom`` degrees of freedom, by the Cornish-Fisher
    expansion around the normal quantile (Abramowitz & Stegun 26.7.5; within 0.5% from 2 degrees)."""
    z = NormalDist().inv_cdf(confidence)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / freedom ** (power + 1) for power, term in enumerate(terms))


def upper_bound(values: list[float], confidence: float) -> float:
    """The one-sided ``confidence`` upper bound of the mean of ``values`` (``confidence`` 0.5: the mean)."""
    count = len(values)
    mean = sum(values) / count
    if confidence == 0.5:
        return mean
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
    return mean + t_quantile(confidence, count - 1) * spread / math.sqrt(count)


class Verifier:
    """Perplexity and KL against the original model on the verification windows, each with its
    upper confidence bound; the original's log-probabilities are computed once and kept
    (``windows × vocabulary`` floats)."""

    def __init__(self, base: Any, windows: torch.Tensor, spec: str, confidence: float = 0.95) -> None:
        if windows.shape[0] < 2:
            raise DatasetError(
                f"verification text {spec} gives one window of {windows.shape[1]} tokens; the confidence bound needs "
                "at least 2."
                " Use more text or raise verify_tokens."
            )
        self.windows, self.spec, self.confidence = windows, spec, confidence
        self.reference = base_log_probs(base, windows)
        self.base_window_nll = self._window_nll(self.reference)
        self.base_nll = sum(self.base_window_nll) / len(self.base_window_nll)
        self.base_perplexity = math.exp(self.base_nll)

    def _window_nll(self, log_probs: list[torch.Tensor]) -> list[float]:
        """Mean next-token loss of each window (nats/token)."""
        losses = [
            -lp[:, :-1].gather(-1, chunk[:, 1:, None]).squeeze(-1).mean(1)
            for lp, chunk in zip(log_probs, self.windows.split(BATCH))
        ]
        return torch.cat(losses).tolist()

    def __call__(self, model: Any) -> dict[str, float]:
        log_probs = base_log_probs(model, self.windows)
        window_nll = self._window_nll(log_probs)
        increase = [m - b for m, b in zip(window_nll, self.base_window_nll)]
        kl = torch.cat([(p.exp() * (p - q)).sum(-1).mean(1) for p, q in zip(self.reference, log_probs)]).tolist()
        mean_increase = sum(increase) / len(increase)
        return {
            "perplexity": math.exp(self.base_nll + mean_increase),
            "ppl_increase": 100 * math.expm1(mean_increase),
            "ppl_increase_upper": 100 * math.expm1(upper_bound(increase, self.confidence)),
            "kl": sum(kl) / len(kl),
            "kl_upper": upper_bound(kl, self.confidence),
            "confidence": self.confidence,
            "windows": len(increase),
            "tokens": int(self.windows.numel()),
        }
