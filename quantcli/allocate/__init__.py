"""Automatic per-layer precision: the smallest checkpoint that meets a quality target, or the best
quality within a size.

``quantcli quantize MODEL --target-ppl-increase 1`` (or ``--target-kl``, ``--target-size``,
``--target-bpw``) gives every tensor a list of candidates (:mod:`.candidates`), rounds it each way
with the run's method (rtn or gptq; gptq shares one Hessian per layer across candidates), predicts
each choice's cost from a measured Fisher-weighted output error validated against measured KL
(:mod:`.sensitivity`), solves the allocation exactly (:mod:`.solver`), and verifies it on held-out
text, tightening and repeating a bounded number of times (:mod:`.search`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from quantcli.allocate.candidates import DEFAULT_CANDIDATES, parse_candidates
from quantcli.errors import InputError, option

TARGETS = ("target_ppl_increase", "target_kl", "target_size", "target_bpw")
ALLOCATING_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class AllocationConfig:
    """One target (exactly one of the four ``target_*``) and how to search for it: ``candidates``
    per tensor; ``search_dataset`` (proxy check, default the calibration text) and
    ``verify_dataset`` (the tighten-and-repeat check, default the eval text) with their token
    budgets; ``max_rounds`` verifications at most; a quality target counts as met when the
    one-sided ``confidence`` upper bound of the verified increase is within it (0.5: its mean);
    ``plot`` a PNG of the size/quality curve."""

    target_ppl_increase: float | None = None
    target_kl: float | None = None
    target_size: Any = None
    target_bpw: float | None = None
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    search_dataset: str | None = None
    verify_dataset: str | None = None
    search_tokens: int = 2048
    verify_tokens: int = 8192
    fisher_samples: int = 32
    probe_layers: int = 8
    max_rounds: int = 4
    confidence: float = 0.95
    plot: str | None = None

    def __post_init__(self) -> None:
        from quantcli.config.quantize import check_positive, parse_size

        given = [name for name in TARGETS if getattr(self, name) is not None]
        if len(given) != 1:
            listed = ", ".join(option(f"allocation.{name}") for name in TARGETS)
            got = f" (got {' and '.join(option(f'allocation.{name}') for name in given)})" if given else ""
            raise InputError(f"pass exactly one allocation target: {listed}{got}.")
        for name in ("target_ppl_increase", "target_kl", "target_bpw"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise InputError(f"{option(f'allocation.{name}')} must be a positive number, got {value!r}.")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or not 0.5 <= self.confidence < 1:
            raise InputError(f"allocation.confidence (a recipe key) must be at least 0.5 and below 1 (0.95: a 95% upper bound), got {self.confidence!r}.")
        if self.target_bpw is not None and self.target_bpw > 32:
            raise InputError(f"{option('allocation.target_bpw')} must be at most 32 bits per weight, got {self.target_bpw!r}.")
        if self.target_size is not None:
            try:
                object.__setattr__(self, "target_size", parse_size(self.target_size))
            except InputError:
                raise InputError(f"{option('allocation.target_size')} must be a size such as 80MB or 1.5GB, got {self.target_size!r}.") from None
        if isinstance(self.candidates, str):
            object.__setattr__(self, "candidates", tuple(part for part in self.candidates.split(",") if part.strip()))
        object.__setattr__(self, "candidates", tuple(c.name for c in parse_candidates(list(self.candidates))))
        if self.plot is not None and not str(self.plot).lower().endswith(".png"):
            raise InputError(f"{option('allocation.plot', self.plot)}: write a .png file.")
        for name in ("search_tokens", "verify_tokens", "fisher_samples", "probe_layers", "max_rounds"):
            check_positive(name.replace("_", " "), getattr(self, name))

    @property
    def target(self) -> tuple[str, float]:
        """``(kind, value)``: kind is ``ppl_increase`` (percent), ``kl`` (nats/token), ``size`` (bytes) or ``bpw``."""
        name = next(name for name in TARGETS if getattr(self, name) is not None)
        return name.removeprefix("target_"), getattr(self, name)
