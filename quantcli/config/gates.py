"""CI quality gates: limits a run must meet, checked after the results exist and recorded in them.

``--max-ppl-increase P`` (percent: 2 means perplexity may rise at most 2%), ``--max-size MB``
(quantized weights on disk, MB = 10**6 bytes) and ``--min-speedup X`` (quantized decode tokens/s
over the base model's, from ``quantcli bench --base``). A failed gate is a GateFailedError (exit 4)
raised by :func:`enforce` after the checkpoint, report and printed results are complete.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from quantcli.errors import GateFailedError, InputError, option
from quantcli.limits import check_finite

MB = 10**6


@dataclass(frozen=True)
class GateLimits:
    """The limits to enforce; None means that gate is off."""

    max_ppl_increase: float | None = None
    max_size: float | None = None
    min_speedup: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            check_finite(f"gate {option('gates.' + name)}", value)

    @property
    def active(self) -> bool:
        return any(value is not None for value in asdict(self).values())


@dataclass(frozen=True)
class GateResult:
    """One checked gate: ``value`` against ``limit`` (units: percent, MB, ratio)."""

    name: str
    limit: float
    value: float
    passed: bool

    @property
    def message(self) -> str:
        if self.name == "max_ppl_increase":
            sign = "<=" if self.passed else ">"
            return f"perplexity {self.value:+.2f}% {sign} {option('gates.max_ppl_increase')} {self.limit:g}%"
        if self.name == "max_size":
            sign = "<=" if self.passed else ">"
            return f"size on disk {self.value:.3f} MB {sign} {option('gates.max_size')} {self.limit:g} MB"
        sign = ">=" if self.passed else "<"
        return f"decode speedup {self.value:.2f}x {sign} {option('gates.min_speedup')} {self.limit:g}x"


def check_quantize(limits: GateLimits, report: dict[str, Any]) -> list[GateResult]:
    """The quantize gates (perplexity increase, size on disk) against a quantize report's numbers
    (``min_speedup`` belongs to ``bench``; QuantizeConfig rejects it)."""
    results = []
    if limits.max_ppl_increase is not None:
        delta = report["perplexity_delta"]  # QuantizeConfig refuses this gate without evaluation
        results.append(
            GateResult(
                "max_ppl_increase",
                limits.max_ppl_increase,
                delta["percent"],
                delta["percent"] <= limits.max_ppl_increase,
            )
        )
    if limits.max_size is not None:
        size = report["size"]["quantized_disk_bytes"] / MB
        results.append(GateResult("max_size", limits.max_size, size, size <= limits.max_size))
    return results


def check_speedup(limits: GateLimits, speedup: float | None) -> list[GateResult]:
    """The bench gate: quantized decode tokens/s over the base model's."""
    if limits.min_speedup is None:
        return []
    if speedup is None:
        raise InputError(
            f"{option('gates.min_speedup')} compares against a base model. Pass {option('base', 'MODEL')}."
        )
    return [GateResult("min_speedup", limits.min_speedup, speedup, speedup >= limits.min_speedup)]


def to_records(results: list[GateResult]) -> list[dict[str, Any]]:
    return [asdict(result) for result in results]


def enforce(records: list[dict[str, Any]]) -> None:
    """Raise GateFailedError naming every failed gate and its numbers; do nothing if all passed."""
    failed = [GateResult(**record) for record in records if not record["passed"]]
    if failed:
        raise GateFailedError("gate failed: " + "; ".join(result.message for result in failed))
