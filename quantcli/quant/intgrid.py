"""Integer weight layouts shared by RTN and GPTQ: per-layer grouping plans and quantized tensors.

The group rule, one for rtn and gptq (:func:`group_size_for`): compressed-tensors 0.20 cannot
store a partial last group (its group quantization raises unless the group size divides
``in_features``), so a layer whose width the requested size does not divide gets the largest
``size / 2**k`` of at least 32 that divides it (128 -> 64 on SmolLM2's 576-wide layers: vLLM's
Marlin kernels take groups of 32, 64 and 128, torch's int4 CPU kernel 32-256), else the divisor of
its width nearest the request (at least 8; stories260K's 172-wide ``down_proj`` gets 43).
:func:`describe_grouping` states the outcome once for the report. Per channel only when asked
(``-1``); a group size that divides none of the selected layers is an input error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, option
from quantcli.quant.activations import check_activations
from quantcli.quant.layers import weight_matrix
from quantcli.quant.smoothing import check_smoothing

if TYPE_CHECKING:
    import torch

DEFAULT_GROUP_SIZE = (
    32  # below 8 bits; with 16-bit scales the same bytes as groups of 64 with fp32 ones (docs/WHOLEMODEL.md)
)
PER_CHANNEL = -1  # a grid config's group size for one scale per output channel (as ``--group-size -1``)
SMALLEST_KERNEL_GROUP = 32  # vLLM Marlin: -1, 32, 64, 128; Machete: -1, 128; torch int4 CPU: 32-256
SMALLEST_GROUP = 8


@dataclass(frozen=True)
class IntLayout:
    """Bits, symmetry and grouping of one layer's integers (``group_size=None``: per channel), the
    observer that picks their scales (``minmax``, ``mse`` or ``signed``; it does not change the
    storage), the dtype the scales are stored in (``bfloat16``...; None: the weight's own), whether
    the layer is the input embedding or output head (``table``: stored as its own kind, see
    :mod:`quantcli.formats.compressed_tensors`), and ``activations`` (``"int8"``: the layer's inputs
    are quantized too, dynamic per token, W8A8; None: weight-only)."""

    bits: int
    symmetric: bool
    group_size: int | None
    observer: str = "minmax"
    scale_dtype: str | None = None
    table: bool = False
    activations: str | None = None

    def scale_dtype_for(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The torch dtype the scales are rounded to and stored in, for a weight held in ``weight_dtype``."""
        import torch

        return weight_dtype if self.scale_dtype is None else getattr(torch, self.scale_dtype)


@dataclass(frozen=True)
class IntGridConfig:
    """The integer grid rtn and gptq share, and their options' one typed home: ``group_size`` weights
    per scale (-1: per channel; None, only when given: the width's default, 32 below 8 bits and per
    channel at 8; stored resolved, so never None after construction), symmetric integers or zero points,
    and the ``observer`` that picks the scales (``minmax``, ``mse`` or ``signed``: see
    :func:`quantcli.quant.ops.compute_qparams`;
    None for :func:`default_observer`)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    observer: str | None = None
    activations: str | None = None  # "int8": W8A8, inputs quantized per token at run time (quantcli.quant.activations)
    smoothing: float | None = None  # with W8A8: SmoothQuant's migration strength alpha (quantcli.quant.smoothing)

    def __post_init__(self) -> None:

        if self.observer is None:
            object.__setattr__(self, "observer", default_observer(self.bits, self.symmetric))
        check_observer(self.observer)
        if self.observer == "signed" and not self.symmetric:
            raise InputError(
                "observer signed puts each group's largest weight on the lowest code of a symmetric grid; drop "
                f"{option('symmetric', False)} or use {option('observer', 'minmax')}."
            )
        object.__setattr__(self, "group_size", resolve_group_size(self.group_size, self.bits))
        check_activations(self.activations, self.bits, self.symmetric, self.layout_group_size)
        check_smoothing(self.smoothing, self.activations)

    @property
    def layout_group_size(self) -> int | None:
        """The group size as :class:`IntLayout` writes it (None: per channel)."""
        return None if self.group_size == PER_CHANNEL else self.group_size

    def grid_options(self) -> dict[str, object]:
        extra = {key: getattr(self, key) for key in ("activations", "smoothing") if getattr(self, key) is not None}
        return {"group_size": self.group_size, "symmetric": self.symmetric, "observer": self.observer, **extra}


@dataclass
class IntWeights:
    """A layer's integers ``q`` (int8, ``[out, in]``) with per-group ``scale`` and ``zero_point``."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    layout: IntLayout


def resolve_group_size(group_size: int | None, bits: int) -> int:
    """Method default (32 below 8 bits, per channel at 8) for None; :data:`PER_CHANNEL` (-1) means per channel."""
    if group_size is None:
        return DEFAULT_GROUP_SIZE if bits < 8 else PER_CHANNEL
    if group_size <= 0 and group_size != PER_CHANNEL:
        raise InputError(f"group size must be a positive integer or -1 (per channel), got {group_size}.")
    return group_size


def default_observer(bits: int, symmetric: bool) -> str:
    """``signed`` (llama.cpp's Q4_0/Q8_0 rule, every code used, the largest weight exact) for symmetric
    grids, else ``minmax``.

    Measured on SmolLM2-135M (docs/WHOLEMODEL.md): round-to-nearest int4 in groups of 32 costs +15.4%
    perplexity with ``signed`` against +29.9% with ``minmax`` (absmax/7.5, one code unreachable per
    sign); int8 (linears per channel, embedding in groups of 64, bfloat16 scales) +0.039% against
    +0.165%: ``minmax``'s absmax/127.5 leaves the largest weights half a step off, more once the scale
    is rounded to 16 bits. compressed-tensors stores the negative scales it needs exactly, and vLLM's
    kernels multiply by the scale whatever its sign. Asymmetric grids have a zero point and use every
    code anyway.
    """
    return "signed" if symmetric else "minmax"


def check_observer(observer: str) -> str:
    from quantcli.quant.ops import OBSERVERS

    if observer not in OBSERVERS:
        raise InputError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}.")
    return observer


def group_size_for(in_features: int, requested: int) -> int:
    """The group size a layer of ``in_features`` inputs gets when ``requested`` is asked (see above)."""
    size = requested
    while size % 2 == 0 and size // 2 >= SMALLEST_KERNEL_GROUP and in_features % size:
        size //= 2
    if in_features % size == 0:
        return size
    divisors = [d for d in range(SMALLEST_GROUP, in_features + 1) if in_features % d == 0] or [in_features]
    return min(divisors, key=lambda d: (abs(d - requested), d))


def plan_layouts(
    model: Any,
    names: tuple[str, ...],
    bits: int,
    symmetric: bool,
    group_size: int | None,
    observer: str = "minmax",
    scale_dtype: str | None = None,
    activations: str | None = None,
) -> dict[str, IntLayout]:
    """Each layer's layout, group sizes by :func:`group_size_for`, scales stored in ``scale_dtype``,
    inputs quantized as ``activations`` says (None: weight-only)."""
    from math import gcd

    from quantcli.quant.moe import is_expert_layer

    modules = dict(model.named_modules())
    widths = {name: weight_matrix(modules[name]).shape[1] for name in names}
    experts = [name for name in names if is_expert_layer(name)]
    if experts:  # one grid for every expert: transformers decompresses all experts with one scheme at load
        shared = gcd(*(widths[name] for name in experts))
        widths.update(dict.fromkeys(experts, shared))
    if group_size is not None and all(width % group_size for width in widths.values()):
        listed = sorted(set(widths.values()))
        raise InputError(
            f"group size {group_size} divides none of the selected layers' input widths "
            f"({', '.join(map(str, listed))})."
            f" Pick a divisor of them, e.g. {min(listed) // 2 if min(listed) % 2 == 0 else min(listed)}, or -1 for "
            "per-channel."
        )
    # experts keep their scales in the model's own dtype: transformers 5.25 leaves experts it dequantizes
    # at load in the scales' dtype, so bfloat16 scales would make an fp32 model compute its experts in bfloat16
    return {
        name: IntLayout(
            bits,
            symmetric,
            None if group_size is None else group_size_for(width, group_size),
            observer,
            None if name in experts else scale_dtype,
            activations=activations,
        )
        for name, width in widths.items()
    }


TABLE_NOTE = "embedding table: round-to-nearest per {unit} (its inputs are one-hot, so there is no useful Hessian)"


TABLE_GROUP = 32  # int8 embedding rows in groups of 32, as llama.cpp's Q8_0 blocks (SmolLM2: docs/WHOLEMODEL.md)


def table_layouts(
    model: Any, tables: tuple[str, ...], bits: int, grid: IntGridConfig, scale_dtype: str | None = None
) -> dict[str, IntLayout]:
    """Layouts of the input embedding / output head ``[vocab, hidden]``: 8 bits symmetric in groups of
    :data:`TABLE_GROUP` with the ``signed`` observer (the default at every width, as llama.cpp keeps
    ``token_embd`` in Q8_0), or 4 bits on the layers' grid."""
    modules = dict(model.named_modules())
    if bits == 8:
        return {
            name: IntLayout(
                8,
                True,
                group_size_for(weight_matrix(modules[name]).shape[1], TABLE_GROUP),
                "signed",
                scale_dtype,
                table=True,
            )
            for name in tables
        }
    requested = grid.layout_group_size or DEFAULT_GROUP_SIZE
    return {
        name: IntLayout(
            bits,
            grid.symmetric,
            group_size_for(weight_matrix(modules[name]).shape[1], requested),
            grid.observer,
            scale_dtype,
            table=True,
        )
        for name in tables
    }


def describe_grouping(requested: int | None, layers: dict[str, tuple[int, int | None]]) -> dict[str, Any]:
    """How the integer layers were grouped, stated once: ``layers`` maps names to
    ``(in_features, group_size)``; returns the request, layer counts per size used, the widths that
    got another size, and a one-line summary."""
    used: dict[str, int] = {}
    changed: dict[tuple[int, int | None], int] = {}
    for width, size in layers.values():
        key = "channel" if size is None else str(size)
        used[key] = used.get(key, 0) + 1
        if size != requested:
            changed[width, size] = changed.get((width, size), 0) + 1
    if requested is None:
        summary = f"grouping: per channel, all {len(layers)} integer layers"
    else:
        parts = [f"{used.get(str(requested), 0)} layers in groups of {requested}"]
        parts += [
            f"{count} layers with in_features {width} in groups of {size} ({requested} does not divide {width})"
            for (width, size), count in sorted(changed.items())
        ]
        summary = "grouping: " + "; ".join(parts)
    changed_widths = {str(width): size for width, size in sorted(changed)}
    return {"requested": requested, "layers_per_group_size": used, "changed_widths": changed_widths, "summary": summary}


def request_layouts(request: Any) -> dict[str, IntLayout]:
    """Every layout an integer method's request asks for: its layers' (:func:`plan_layouts`) and its tables'
    (:func:`table_layouts`), on the method's grid (``request.config``, an :class:`IntGridConfig`)."""
    config, model = request.config, request.model
    plan = plan_layouts(
        model,
        request.layers,
        config.bits,
        config.symmetric,
        config.layout_group_size,
        config.observer,
        request.scale_dtype,
        config.activations,
    )
    plan.update(table_layouts(model, request.tables, request.table_bits, config, request.scale_dtype))
    return plan
