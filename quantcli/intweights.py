"""Integer weight layouts shared by RTN and GPTQ: per-layer grouping plans and quantized tensors.

The group rule, one for every method: a layer whose ``in_features`` the group size does not
divide is quantized per output channel instead (stories260K's ``down_proj`` has 172 inputs), and
the report lists it. A group size that divides none of the selected layers is an input error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError
from quantcli.models import weight_matrix

if TYPE_CHECKING:
    import torch

DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class IntLayout:
    """Bits, symmetry and grouping of one layer's integers (``group_size=None``: per channel), and
    the observer that picks their scales (``minmax`` or ``mse``; it does not change the storage)."""

    bits: int
    symmetric: bool
    group_size: int | None
    observer: str = "minmax"


@dataclass(frozen=True)
class IntGridConfig:
    """The integer grid rtn and gptq share, and their options' one typed home: ``group_size`` weights
    per scale (given as None for the width's default, 64 below 8 bits and per channel at 8, or -1 for
    per channel; stored resolved, None then meaning per channel), symmetric integers or zero points,
    and the ``observer`` that picks the scales (``minmax`` or ``mse``)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    observer: str = "minmax"

    def __post_init__(self) -> None:
        check_observer(self.observer)
        object.__setattr__(self, "group_size", resolve_group_size(self.group_size, self.bits))

    def grid_options(self) -> dict[str, object]:
        return {"group_size": self.group_size, "symmetric": self.symmetric, "observer": self.observer}


@dataclass
class IntWeights:
    """A layer's integers ``q`` (int8, ``[out, in]``) with per-group ``scale`` and ``zero_point``."""

    q: "torch.Tensor"
    scale: "torch.Tensor"
    zero_point: "torch.Tensor"
    layout: IntLayout


def resolve_group_size(group_size: int | None, bits: int) -> int | None:
    """Method default (64 below 8 bits, per channel at 8) for None; -1 means per channel."""
    if group_size is None:
        return DEFAULT_GROUP_SIZE if bits < 8 else None
    if group_size == -1:
        return None
    if group_size <= 0:
        raise InputError(f"group size must be a positive integer or -1 (per channel), got {group_size}.")
    return group_size


def check_observer(observer: str) -> str:
    from quantcli.ops import OBSERVERS

    if observer not in OBSERVERS:
        raise InputError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}.")
    return observer


def plan_layouts(
    model: Any, names: tuple[str, ...], bits: int, symmetric: bool, group_size: int | None, observer: str = "minmax"
) -> dict[str, tuple[IntLayout, str | None]]:
    """Each layer's layout and, where the group rule changed it, the reason."""
    modules = dict(model.named_modules())
    plan: dict[str, tuple[IntLayout, str | None]] = {}
    for name in names:
        in_features = weight_matrix(modules[name]).shape[1]
        if group_size is None or in_features % group_size == 0:
            plan[name] = (IntLayout(bits, symmetric, group_size, observer), None)
        else:
            note = f"per-channel: group size {group_size} does not divide in_features {in_features}"
            plan[name] = (IntLayout(bits, symmetric, None, observer), note)
    if group_size is not None and all(note for _, note in plan.values()):
        widths = sorted({weight_matrix(modules[n]).shape[1] for n in names})
        raise InputError(
            f"group size {group_size} divides none of the selected layers' input widths ({', '.join(map(str, widths))})."
            f" Pick a divisor of them, e.g. {min(widths) // 2 if min(widths) % 2 == 0 else min(widths)}, or -1 for per-channel."
        )
    return plan
