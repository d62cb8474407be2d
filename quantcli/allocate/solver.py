"""The allocation as a multiple-choice knapsack: one choice per tensor, minimising the sum of one
quantity (bytes, or predicted loss) while the sum of the other stays within a budget.

Exact dynamic programming over the constrained quantity measured in ``resolution`` units of the
budget, each choice's amount rounded *up*: the answer always meets the real budget, and is the true
optimum whenever the amounts are whole units (what the brute-force test checks); otherwise it is at
most one unit per tensor from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def solve(
    costs: Sequence[Sequence[float]], amounts: Sequence[Sequence[float]], budget: float, resolution: int = 20000
) -> list[int] | None:
    """Per tensor, the index of its choice that minimises ``sum(costs)`` with ``sum(amounts) <= budget``
    (None when no choice fits). Ties go to the earlier choice."""
    if budget < 0:
        return None
    unit = budget / resolution if budget > 0 else 1.0
    steps = resolution if budget > 0 else 0
    best = np.zeros(steps + 1)
    picks = []
    for cost_row, amount_row in zip(costs, amounts):
        units = [math.ceil(amount / unit - 1e-9) if amount > 0 else 0 for amount in amount_row]
        options = np.full((len(units), steps + 1), np.inf)
        for index, (cost, need) in enumerate(zip(cost_row, units)):
            if need <= steps:
                options[index, need:] = best[: steps + 1 - need] + cost
        pick = options.argmin(axis=0)
        best = options[pick, np.arange(steps + 1)]
        picks.append((pick, units))
    if not np.isfinite(best[steps]):
        return None
    chosen, room = [], steps
    for pick, units in reversed(picks):
        index = int(pick[room])
        chosen.append(index)
        room -= units[index]
    return chosen[::-1]
