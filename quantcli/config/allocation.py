"""What a per-layer precision search is asked for: one target, the candidates per tensor, its budgets.

A candidate is ``keep`` (the tensor as loaded) or ``intB[-gG]``: B-bit integers (3, 4 or 8) in groups of G
inputs (per channel without ``-g``). The search itself is :mod:`quantcli.allocate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.config.validators import check_positive, parse_size
from quantcli.errors import InputError, option
from quantcli.quant.intgrid import IntLayout, group_size_for

if TYPE_CHECKING:
    from quantcli.quant.intgrid import IntLayout

KEEP = "keep"
DEFAULT_CANDIDATES = (KEEP, "int8", "int4-g128", "int4-g64", "int4-g32", "int3-g32")
_PATTERN = re.compile(r"int([348])(?:-g(\d+))?")


@dataclass(frozen=True)
class Candidate:
    """One storage choice: ``bits`` None means keep the tensor as it is."""

    name: str
    bits: int | None = None
    group_size: int | None = None

    def layout(
        self, in_features: int, symmetric: bool, observer: str, scale_dtype: str | None = None
    ) -> IntLayout | None:
        if self.bits is None:
            return None
        group = None if self.group_size is None else group_size_for(in_features, self.group_size)
        return IntLayout(self.bits, symmetric, group, observer, scale_dtype)


def parse_candidates(names: tuple[str, ...] | list[str]) -> tuple[Candidate, ...]:
    """Candidates from names such as ``keep, int8, int4-g128, int3-g32`` (order kept, duplicates refused)."""
    parsed = []
    for name in names:
        name = name.strip().lower()
        match = _PATTERN.fullmatch(name)
        if name == KEEP:
            parsed.append(Candidate(KEEP))
        elif match and (match.group(2) is None or int(match.group(2)) > 0):
            parsed.append(Candidate(name, int(match.group(1)), int(match.group(2)) if match.group(2) else None))
        else:
            raise InputError(
                f"unknown candidate {name!r}: use keep, int8, int4, int3, optionally with a group size as in int4-g128."
            )
    if len({c.name for c in parsed}) != len(parsed):
        raise InputError(f"{option('allocation.candidates')} lists a candidate twice: {', '.join(names)}.")
    if not any(c.bits for c in parsed):
        raise InputError(
            f"{option('allocation.candidates')} needs at least one integer candidate (e.g. int4-g128) besides keep."
        )
    return tuple(parsed)


TARGETS = ("target_ppl_increase", "target_kl", "target_size", "target_bpw")


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
        given = [name for name in TARGETS if getattr(self, name) is not None]
        if len(given) != 1:
            listed = ", ".join(option(f"allocation.{name}") for name in TARGETS)
            got = f" (got {' and '.join(option(f'allocation.{name}') for name in given)})" if given else ""
            raise InputError(f"pass exactly one allocation target: {listed}{got}.")
        for name in ("target_ppl_increase", "target_kl", "target_bpw"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise InputError(f"{option(f'allocation.{name}')} must be a positive number, got {value!r}.")
        if (
            isinstance(self.confidence, bool)
            or not isinstance(self.confidence, (int, float))
            or not 0.5 <= self.confidence < 1
        ):
            raise InputError(
                "allocation.confidence (a recipe key) must be at least 0.5 and below 1 (0.95: a 95% upper bound), got "
                f"{self.confidence!r}."
            )
        if self.target_bpw is not None and self.target_bpw > 32:
            raise InputError(
                f"{option('allocation.target_bpw')} must be at most 32 bits per weight, got {self.target_bpw!r}."
            )
        if self.target_size is not None:
            try:
                object.__setattr__(self, "target_size", parse_size(self.target_size))
            except InputError:
                raise InputError(
                    f"{option('allocation.target_size')} must be a size such as 80MB or 1.5GB, got "
                    f"{self.target_size!r}."
                ) from None
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
