"""The allocation's parts: candidates per tensor, measured sensitivities, an exact solve, and a bounded
verify-tighten-repeat loop on held-out text. Deterministic for a seed.

1. Hessians ``2/n·XᵀX`` of every layer on the calibration windows (one pass through the unquantized
   model), and the output Fisher diagonal from a few of them (:mod:`.sensitivity`).
2. Every layer rounded by every candidate with the run's method (gptq reuses the layer's one Hessian
   for each), its exact bytes (:mod:`.candidates`) and its proxy cost.
3. The proxy is checked on the search text: KL with only one layer changed, for ``probe_layers``
   layers × 2 candidates, gives the rank correlation and the one global scale predictions use.
4. Solve (:mod:`.solver`); build the model; measure it on the verification text (:mod:`.verify`);
   if the upper confidence bound of its increase misses the target, scale the budget by
   target/bound and repeat (at most ``max_rounds``); keep the smallest result whose bound met it.
   Uniform schemes are measured on the same text for the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from quantcli.allocate.candidates import checkpoint_bytes, stored_bytes
from quantcli.allocate.sensitivity import base_log_probs, measured_kl, proxy, spearman
from quantcli.allocate.solver import solve
from quantcli.config.allocation import Candidate
from quantcli.errors import GateFailedError, option
from quantcli.methods.rtn import round_to_nearest
from quantcli.quant import ops
from quantcli.quant.gptq_solver import gptq_quantize
from quantcli.quant.intgrid import TABLE_NOTE, IntLayout, IntWeights, table_layouts
from quantcli.quant.layers import is_tied, set_weight_matrix, weight_matrix


@dataclass
class Option:
    """One way to store one layer: the candidates that land on it, its layout (None: kept), exact
    bytes, proxy cost (nats/token, before the fitted scale), and its integers."""

    names: list[str]
    layout: IntLayout | None
    bytes: int
    proxy: float = 0.0
    predicted: float = 0.0  # proxy times the scale fitted to measured KL
    weights: IntWeights | None = None
    notes: list[str] = field(default_factory=list)
    # the option every uniform scheme gives this tensor when no candidate names it (a table's --embeddings choice)
    uniform: bool = False


def round_layer(
    method: str, config: Any, matrix: torch.Tensor, hessian: torch.Tensor | None, layout: IntLayout
) -> tuple[IntWeights, list[str]]:
    """``matrix`` as ``layout`` by the run's method: gptq with the layer's Hessian, or rtn."""
    if method == "gptq":
        hessian = hessian if hessian is not None else torch.zeros(matrix.shape[1], matrix.shape[1])
        return gptq_quantize(
            matrix, hessian, layout, config.damp, config.block_size, config.act_order, clip_search=config.clip_search
        )

    return round_to_nearest(matrix, layout), []


def dequantized(option: Option) -> torch.Tensor:
    w = option.weights
    return ops.dequantize(w.q, w.scale, w.zero_point, w.layout.group_size)


def layer_options(
    model: Any,
    names: tuple[str, ...],
    candidates: tuple[Candidate, ...],
    method: str,
    config: Any,
    found: dict[str, Any],
    fisher: dict[str, torch.Tensor],
    advance: Any,
    kept_size: int | None = None,
    scale_dtype: str | None = None,
) -> dict[str, list[Option]]:
    """Every layer's distinct options, cheapest first (``kept_size``: bytes per kept weight on disk;
    ``scale_dtype``: what the scales are stored in, None: the weight's dtype)."""
    modules = dict(model.named_modules())
    table: dict[str, list[Option]] = {}
    for name in names:
        matrix = weight_matrix(modules[name])
        out_features, in_features = matrix.shape
        options: dict[IntLayout | None, Option] = {}
        for candidate in candidates:
            layout = candidate.layout(in_features, config.symmetric, config.observer, scale_dtype)
            if layout in options:
                options[layout].names.append(candidate.name)
                continue
            dtype_bytes = kept_size if layout is None and kept_size else matrix.element_size()
            option = options[layout] = Option(
                [candidate.name], layout, stored_bytes(layout, out_features, in_features, dtype_bytes)
            )
            if layout is not None:
                option.weights, option.notes = round_layer(method, config, matrix, found.get(name), layout)
                option.proxy = proxy(matrix.float() - dequantized(option).float(), found.get(name), fisher[name])
        table[name] = sorted(options.values(), key=lambda o: o.bytes)
        advance(1)
    return table


def table_options(
    model: Any, base: Any, request: Any, windows: torch.Tensor, keep: bool, kept_size: int | None = None
) -> dict[str, list[Option]]:
    """The input embedding (and an untied head), searched like the layers: kept (when ``keep`` is a
    candidate), or rounded to nearest as ``--embeddings`` asks (8: int8 in groups of 32; 4: that or
    the layers' 4-bit grid; scales in ``request.scale_dtype``). No Hessian (their inputs are
    one-hot), so each option's cost is measured: the KL on ``windows`` with only that table changed.
    A head tied to a quantized embedding stores the scales again: counted in the option's bytes."""

    modules = dict(model.named_modules())
    reference = base_log_probs(base, windows) if request.tables else []
    layouts = [
        table_layouts(model, request.tables, bits, request.config, request.scale_dtype)
        for bits in sorted({8, request.table_bits})
    ]
    table = {}
    for name in request.tables:
        original = weight_matrix(modules[name])
        rows, width = original.shape
        options = (
            [Option(["keep"], None, stored_bytes(None, rows, width, kept_size or original.element_size()))]
            if keep
            else []
        )
        for layout in (found[name] for found in layouts):
            unit, groups = (
                ("row", 1)
                if layout.group_size is None
                else (f"group of {layout.group_size}", width // layout.group_size)
            )
            label = f"int{layout.bits}" + ("" if layout.group_size is None else f"-g{layout.group_size}")
            head_scales = (
                rows * groups * (2 if layout.scale_dtype in ("bfloat16", "float16") else original.element_size())
                if is_tied(model)
                else 0
            )
            weights, _ = round_layer("rtn", request.config, original, None, layout)
            option = Option(
                [label],
                layout,
                stored_bytes(layout, rows, width, original.element_size()) + head_scales,
                weights=weights,
                notes=[TABLE_NOTE.format(unit=unit)],
                uniform=layout.bits == request.table_bits,
            )  # uniform: what `--embeddings B` writes
            saved = original.clone()
            set_weight_matrix(modules[name], dequantized(option))
            option.predicted = measured_kl(model, windows, reference)
            set_weight_matrix(modules[name], saved)
            options.append(option)
        table[name] = sorted(options, key=lambda o: o.bytes)
    return table


def probe(model: Any, base: Any, table: dict[str, list[Option]], windows: torch.Tensor, layers: int) -> dict[str, Any]:
    """Measured KL with one layer changed, for ``layers`` layers evenly spaced × their smallest and
    middle integer options: the proxy's rank correlation and the scale that maps it to KL."""
    modules, names = dict(model.named_modules()), list(table)
    reference = base_log_probs(base, windows)
    picked = sorted(
        {names[round(i * (len(names) - 1) / max(layers - 1, 1))] for i in range(min(layers, len(names)))},
        key=names.index,
    )
    pairs = []
    for name in picked:
        integer = [o for o in table[name] if o.weights is not None]
        for opt in {id(o): o for o in (integer[0], integer[len(integer) // 2])}.values():
            original = weight_matrix(modules[name]).clone()
            set_weight_matrix(modules[name], dequantized(opt))
            pairs.append(
                {
                    "layer": name,
                    "candidate": opt.names[0],
                    "proxy": opt.proxy,
                    "measured_kl": measured_kl(model, windows, reference),
                }
            )
            set_weight_matrix(modules[name], original)
    ratios = sorted(p["measured_kl"] / p["proxy"] for p in pairs if p["proxy"] > 0 and p["measured_kl"] > 0)
    scale = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0
    correlation = spearman([p["proxy"] for p in pairs], [p["measured_kl"] for p in pairs]) if len(pairs) > 1 else None
    return {"pairs": pairs, "spearman": correlation, "scale": scale, "tokens": int(windows.numel())}


def assemble(model: Any, base: Any, table: dict[str, list[Option]], choice: dict[str, int]) -> None:
    """Set every layer of ``model`` to its chosen option (kept layers get the original weights back)."""
    modules, originals = dict(model.named_modules()), dict(base.named_modules())
    for name, index in choice.items():
        option = table[name][index]
        set_weight_matrix(
            modules[name], dequantized(option) if option.weights is not None else weight_matrix(originals[name]).clone()
        )


def _layouts(table: dict[str, list[Option]], choice: dict[str, int]) -> dict[str, IntLayout | None]:
    return {name: table[name][index].layout for name, index in choice.items()}


def _predicted(table: dict[str, list[Option]], choice: dict[str, int]) -> float:
    return sum(table[name][index].predicted for name, index in choice.items())


def _solve(
    table: dict[str, list[Option]], budget: float, by_size: bool, resolution: int = 20000
) -> dict[str, int] | None:
    names = list(table)
    bytes_ = [[o.bytes for o in table[n]] for n in names]
    losses = [[o.predicted for o in table[n]] for n in names]
    picked = solve(losses, bytes_, budget, resolution) if by_size else solve(bytes_, losses, budget, resolution)
    return None if picked is None else dict(zip(names, picked))


def uniform_choices(table: dict[str, list[Option]], candidates: tuple[Candidate, ...]) -> dict[str, dict[str, int]]:
    """Each candidate applied to every layer (its index in each layer's options); a table no candidate
    names takes its ``--embeddings`` option, as a plain quantize would."""

    def index(options: list[Option], name: str) -> int:
        return next(
            (i for i, o in enumerate(options) if name in o.names),
            next((i for i, o in enumerate(options) if o.uniform), 0),
        )

    return {c.name: {n: index(options, c.name) for n, options in table.items()} for c in candidates}


def frontier(
    model: Any, table: dict[str, list[Option]], kept_dtype: str | None = None, points: int = 16
) -> list[dict[str, float]]:
    """The predicted size/KL curve the solver sees: optimal allocations for log-spaced KL budgets."""
    largest = sum(max(o.predicted for o in options) for options in table.values())
    smallest = min((o.predicted for options in table.values() for o in options if o.predicted > 0), default=0.0)
    curve = []
    for step in range(points) if smallest > 0 else []:
        budget = smallest * (largest / smallest) ** (step / (points - 1))
        choice = _solve(table, budget, by_size=False, resolution=4000)
        if choice is not None:
            curve.append(
                {
                    "bytes": checkpoint_bytes(model, _layouts(table, choice), kept_dtype),
                    "predicted_kl": _predicted(table, choice),
                }
            )
    return curve


def size_choice(
    model: Any, table: dict[str, list[Option]], target_bytes: int, kept_dtype: str | None = None
) -> dict[str, int]:
    """The lowest predicted loss whose whole checkpoint fits ``target_bytes`` exactly (header included)."""
    keep_all = {
        name: next(i for i, o in enumerate(options) if o.layout is None)
        if any(o.layout is None for o in options)
        else 0
        for name, options in table.items()
    }
    others = checkpoint_bytes(model, _layouts(table, keep_all), kept_dtype) - sum(
        table[n][i].bytes for n, i in keep_all.items()
    )
    budget = target_bytes - others - 256 * len(table)  # room for the header growing with packed tensors' names
    for _ in range(6):
        choice = _solve(table, budget, by_size=True)
        if choice is None:
            break
        total = checkpoint_bytes(model, _layouts(table, choice), kept_dtype)
        if total <= target_bytes:
            return choice
        budget -= total - target_bytes
    smallest = checkpoint_bytes(model, _layouts(table, {n: 0 for n in table}), kept_dtype)
    raise GateFailedError(
        f"no allocation fits {target_bytes:,} bytes: the smallest candidates give {smallest:,} bytes "
        f"({smallest / 1e6:.3f} MB)."
        f" Raise {option('allocation.target_size')}/{option('allocation.target_bpw')} or add smaller candidates (e.g. "
        "int3-g128)."
    )
