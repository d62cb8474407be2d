"""The rounds of a per-layer precision search: solve within a budget, verify on held-out text, tighten;
and the uniform schemes each result is held against."""

from __future__ import annotations

import math
from typing import Any

from quantcli.allocate.prepare import Prepared
from quantcli.allocate.search import (
    _predicted,
    _solve,
    assemble,
    size_choice,
    uniform_choices,
)
from quantcli.errors import GateFailedError, option
from quantcli.quant.layers import parameter_count, set_weight_matrix, weight_matrix

ENOUGH = 0.8  # a round that meets the target using at least this share of it ends the search


def _met(kind: str, value: float, measured: dict[str, float], total: int, target_bytes: int | None) -> bool:
    """A quality target is met when the upper confidence bound of the measured loss is within it."""
    if kind == "kl":
        return measured["kl_upper"] <= value
    if kind == "ppl_increase":
        return measured["ppl_increase_upper"] <= value
    return total <= target_bytes


def _as_kl(kind: str, measured: dict[str, float]) -> float:
    """The measured loss's upper bound in the budget's unit (nats/token): KL, or log of the perplexity ratio."""
    return measured["kl_upper"] if kind == "kl" else math.log1p(measured["ppl_increase_upper"] / 100)


def decide(
    prepared: Prepared, kind: str, value: float, max_rounds: int
) -> tuple[dict[str, int], list[dict[str, Any]], int, int | None]:
    """Solve, verify, tighten and repeat, then try the uniform schemes that could be smaller: the
    chosen allocation (left assembled in the model), every round, the index of the chosen one, and
    the target in bytes for size targets."""
    model, base, table, verify = prepared.model, prepared.base, prepared.table, prepared.verify
    target_bytes = (
        value if kind == "size" else math.floor(value * parameter_count(model) / 8) if kind == "bpw" else None
    )
    rounds: list[dict[str, Any]] = []
    tried: list[dict[str, int]] = (
        [size_choice(model, table, target_bytes, prepared.kept_dtype)] if target_bytes is not None else []
    )
    budget = budget_target(kind, value)
    for number in range(max_rounds if target_bytes is None else 1):
        choice = tried[-1] if target_bytes is not None else _solve(table, budget, by_size=False)
        if target_bytes is None and choice in tried:
            break
        tried += [] if target_bytes is not None else [choice]
        assemble(model, base, table, choice)
        total = prepared.bytes(choice)
        measured = verify(model)
        met = _met(kind, value, measured, total, target_bytes)
        rounds.append(
            {
                "round": number + 1,
                "budget_kl": None if target_bytes else budget,
                "predicted_kl": _predicted(table, choice),
                "bytes": total,
                "measured": measured,
                "met": met,
            }
        )
        if target_bytes is not None:
            break
        got = _as_kl(kind, measured)
        if met and got >= ENOUGH * budget_target(kind, value):
            break
        budget *= min(max(budget_target(kind, value) / got if got > 0 else 4.0, 0.25), 4.0) * (1.0 if met else 0.95)
    if target_bytes is None:
        _uniform_rounds(prepared, kind, value, rounds, tried)
    passing = [(r["bytes"], i) for i, r in enumerate(rounds) if r["met"]]
    if not passing:
        best = min(rounds, key=lambda r: _as_kl(kind, r["measured"]))
        raise GateFailedError(
            f"allocation missed {option(f'allocation.target_{kind}')} {value:g} on the verification text after "
            f"{len(rounds)} round(s)"
            f" (closest: KL {best['measured']['kl']:.5f} (upper bound {best['measured']['kl_upper']:.5f}), perplexity "
            f"{best['measured']['ppl_increase']:+.2f}%"
            f" (upper bound {best['measured']['ppl_increase_upper']:+.2f}%) at {best['measured']['confidence']:.0%} "
            f"confidence, {best['bytes'] / 1e6:.3f} MB)."
            " Loosen the target, add candidates (keep, int8), raise max_rounds, or verify on more text for a tighter "
            "bound."
        )
    chosen = min(passing)[1]
    assemble(model, base, table, tried[chosen])
    return tried[chosen], rounds, chosen, target_bytes


def _uniform_rounds(
    prepared: Prepared, kind: str, value: float, rounds: list[dict[str, Any]], tried: list[dict[str, int]]
) -> None:
    """Rounds for the uniform schemes smaller than every passing round whose predicted loss is within
    reach (at most 4x the target's budget), smallest first, until one meets the target: a uniform
    scheme is an allocation too, so the result is never larger than one that verifies. (The proxy
    is KL, which is never negative, while a perplexity change can be: for a tight perplexity
    target it can rule out a scheme that meets it.)"""
    table, reach = prepared.table, 4 * budget_target(kind, value)
    best = min((r["bytes"] for r in rounds if r["met"]), default=None)
    schemes = sorted(
        (prepared.bytes(picks), name, picks)
        for name, picks in uniform_choices(table, prepared.candidates).items()
        if name != "keep"
    )
    for total, name, picks in schemes:
        if (best is not None and total >= best) or _predicted(table, picks) > reach or picks in tried:
            continue
        assemble(prepared.model, prepared.base, table, picks)
        measured = prepared.verify(prepared.model)
        met = _met(kind, value, measured, total, None)
        tried.append(picks)
        rounds.append(
            {
                "round": len(rounds) + 1,
                "budget_kl": None,
                "uniform": name,
                "predicted_kl": _predicted(table, picks),
                "bytes": total,
                "measured": measured,
                "met": met,
            }
        )
        if met:
            return


def compare_uniform(prepared: Prepared, kind: str, value: float, target_bytes: int | None) -> list[dict[str, Any]]:
    """Every candidate applied to all layers: bytes and predicted KL for each; measured on the
    verification text from the smallest up until one meets a quality target (for a size target,
    from the largest that fits down until one is measured). Leaves the model as it was."""
    model, base, table = prepared.model, prepared.base, prepared.table
    saved = {name: weight_matrix(module).clone() for name, module in model.named_modules() if name in table}
    schemes = [
        (prepared.bytes(picks), name, picks)
        for name, picks in uniform_choices(table, prepared.candidates).items()
        if name != "keep"
    ]
    order = (
        sorted(schemes) if target_bytes is None else sorted((s for s in schemes if s[0] <= target_bytes), reverse=True)
    )
    uniform = []
    for total, name, picks in order:
        assemble(model, base, table, picks)
        measured = prepared.verify(model)
        uniform.append(
            {
                "candidate": name,
                "bytes": total,
                "predicted_kl": _predicted(table, picks),
                "measured": measured,
                "met": _met(kind, value, measured, total, target_bytes),
            }
        )
        if uniform[-1]["met"]:
            break
    done = {u["candidate"] for u in uniform}
    uniform += [
        {"candidate": name, "bytes": total, "predicted_kl": _predicted(table, picks), "measured": None, "met": None}
        for total, name, picks in schemes
        if name not in done
    ]
    modules = dict(model.named_modules())
    for name, matrix in saved.items():
        set_weight_matrix(modules[name], matrix)
    return uniform


def budget_target(kind: str, value: float) -> float:
    return value if kind == "kl" else math.log1p(value / 100)
