"""``allocate``: what the pipeline calls instead of the method's ``quantize`` when a target is set.

Quality targets (``--target-ppl-increase``, ``--target-kl``) are budgets of predicted KL: the solve
minimises bytes within it, the verification text measures the result, and the budget is scaled by
target/measured until a round meets the target with little to spare (``max_rounds`` at most; the
smallest result that met it is kept). "Meets" means the upper confidence bound of the measured
increase (:mod:`.verify`, ``confidence`` 0.95 by default) is within the target, not just its mean.
Size targets (``--target-size``, ``--target-bpw``) minimise predicted KL within the exact byte
count; the verification text then only reports the quality.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from quantcli.allocate.candidates import checkpoint_bytes
from quantcli.allocate.report import plot_allocation
from quantcli.allocate.search import (
    _layouts,
    _predicted,
    _solve,
    assemble,
    frontier,
    layer_options,
    probe,
    size_choice,
    table_options,
    uniform_choices,
)
from quantcli.allocate.sensitivity import hessians, output_fisher
from quantcli.allocate.verify import Verifier, windows
from quantcli.config.allocation import parse_candidates
from quantcli.errors import GateFailedError, option
from quantcli.formats.compressed_tensors.writer import compressed_result
from quantcli.quant.keptdtype import storage_dtype
from quantcli.quant.layers import parameter_count, set_weight_matrix, weight_matrix
from quantcli.quant.records import QuantizedModel, QuantizeRequest
from quantcli.sources.datasets import read_documents

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


@dataclass
class Prepared:
    """Everything target-independent: the original model, each layer's options with predicted costs,
    the proxy check and the verifier; one preparation serves any number of targets."""

    model: Any
    base: Any
    table: dict[str, list[Any]]
    candidates: tuple[Any, ...]
    check: dict[str, Any]
    verify: Verifier
    texts: tuple[str, str, str]
    seconds: dict[str, float]
    kept_dtype: str | None = None  # the dtype unquantized tensors are stored in (quantcli.quant.keptdtype)

    def bytes(self, choice: dict[str, int]) -> int:
        return checkpoint_bytes(self.model, _layouts(self.table, choice), self.kept_dtype)


def prepare(request: QuantizeRequest, method: str, config: Any, progress: Any) -> Prepared:
    """Measure sensitivities and round every layer every way (``request.model`` is left unchanged)."""
    alloc, calib, model = config.allocation, config.calibration, request.model
    candidates = parse_candidates(list(alloc.candidates))
    search_spec = alloc.search_dataset or calib.dataset
    verify_spec = alloc.verify_dataset or (config.eval.dataset if config.eval is not None else calib.dataset)
    search_source, verify_source = (
        read_documents(search_spec, calib.text_column),
        read_documents(verify_spec, calib.text_column),
    )
    seq_len = config.eval.seq_len if config.eval is not None else calib.seq_len
    seconds: dict[str, float] = {}

    kept = storage_dtype(config.keep_dtype or "auto", request.source, model)
    kept_dtype = str(kept).removeprefix("torch.") if kept is not None else None
    start = time.perf_counter()
    base = copy.deepcopy(model).eval()
    with progress.task("allocation: Hessians and output Fisher", total=None):
        found = hessians(model, request.layers, request.calibration)
        fisher = output_fisher(model, request.layers, request.calibration[: alloc.fisher_samples], calib.seed)
    seconds["sensitivity"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress.task(
        f"allocation: {len(candidates)} candidates per layer ({method})", total=len(request.layers)
    ) as advance:
        table = layer_options(
            model,
            request.layers,
            candidates,
            method,
            request.config,
            found,
            fisher,
            lambda n: (advance(n), request.progress(n)),
            kept.itemsize if kept is not None else None,
            request.scale_dtype,
        )
    del found
    seconds["candidates"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress.task("allocation: proxy check on the search text", total=None):
        search = windows(search_source, request.tokenizer, alloc.search_tokens, calib.seq_len, "search")
        check = probe(model, base, table, search, alloc.probe_layers)
    for options in table.values():
        for opt in options:
            opt.predicted = check["scale"] * opt.proxy
    keep = any(c.bits is None for c in candidates)
    table.update(
        table_options(model, base, request, search, keep, kept.itemsize if kept is not None else None)
    )  # costs measured, not predicted
    verify = Verifier(
        base,
        windows(verify_source, request.tokenizer, alloc.verify_tokens, seq_len, "verification"),
        verify_spec,
        alloc.confidence,
    )
    seconds["proxy_check"] = time.perf_counter() - start
    return Prepared(
        model, base, table, candidates, check, verify, (calib.dataset, search_spec, verify_spec), seconds, kept_dtype
    )


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


def allocate(request: QuantizeRequest, method: str, config: Any, progress: Any) -> QuantizedModel:
    """Quantize ``request.model`` in place with a per-layer allocation meeting ``config.allocation``'s target."""
    alloc = config.allocation
    kind, value = alloc.target
    prepared = prepare(request, method, config, progress)
    start = time.perf_counter()
    with progress.task("allocation: solve and verify", total=None):
        choice, rounds, chosen, target_bytes = decide(prepared, kind, value, alloc.max_rounds)
        prepared.seconds["solve_verify"] = time.perf_counter() - start
        start = time.perf_counter()
        uniform = compare_uniform(prepared, kind, value, target_bytes)
        prepared.seconds["uniform"] = time.perf_counter() - start
    table, model = prepared.table, prepared.model
    layers, records, notes = {}, {}, {}
    for name, index in choice.items():
        option = table[name][index]
        layers[name] = {
            "choice": option.names[0],
            "same_as": option.names[1:],
            "bits": option.layout.bits if option.layout else None,
            "group_size": option.layout.group_size if option.layout else None,
            "bytes": option.bytes,
            "predicted_kl": option.predicted,
        }
        if option.weights is not None:
            records[name], notes[name] = option.weights, list(option.notes)
    summary = _summary(
        kind,
        value,
        target_bytes,
        method,
        prepared.candidates,
        prepared.texts,
        prepared.check,
        rounds,
        chosen,
        prepared.verify.base_perplexity,
        layers,
        uniform,
        frontier(model, table, prepared.kept_dtype),
        prepared.seconds,
    )
    prepared_kept = prepared.kept_dtype
    del prepared
    weights: Counter = Counter()
    for name, record in records.items():
        if name not in request.tables:  # the embedding's fixed 8 bits would outweigh a 4-bit body
            weights[record.layout.bits] += record.q.numel()
    kept_bits = 32 if prepared_kept == "float32" else 16  # nothing quantized: the checkpoint is the kept dtype
    bits = weights.most_common(1)[0][0] if weights else kept_bits
    options = {key: val for key, val in request.config.grid_options().items() if key != "group_size"}
    if method == "gptq":
        options.update(
            {key: val for key, val in vars(request.config).items() if key not in ("bits", "group_size", *options)}
        )
    options["allocation"] = {"target": summary["target"], "candidates": summary["candidates"]}
    if alloc.plot:
        from pathlib import Path

        plot_allocation(summary, Path(alloc.plot))
    return compressed_result(model, method, bits, options, records, notes, {"allocation": summary})


def budget_target(kind: str, value: float) -> float:
    return value if kind == "kl" else math.log1p(value / 100)


def _summary(
    kind,
    value,
    target_bytes,
    method,
    candidates,
    texts,
    check,
    rounds,
    chosen,
    base_ppl,
    layers,
    uniform,
    curve,
    seconds,
) -> dict[str, Any]:
    """What was decided and why, for the report, quantcli.json and the plot."""
    final = rounds[chosen]
    meeting = [u for u in uniform if u["met"]]
    if target_bytes is None:
        best = min(meeting, key=lambda u: u["bytes"], default=None)
    else:
        best = min(meeting, key=lambda u: u["measured"]["kl"], default=None)
    counts = Counter(layer["choice"] for layer in layers.values())
    return {
        "target": {"kind": kind, "value": value, "bytes": target_bytes},
        "method": method,
        "candidates": [c.name for c in candidates],
        "texts": {
            "calibration": texts[0],
            "search": texts[1],
            "verify": texts[2],
            "search_tokens": check["tokens"],
            "verify_tokens": final["measured"]["tokens"],
            "verify_windows": final["measured"]["windows"],
            "verify_base_perplexity": base_ppl,
        },
        "proxy_check": check,
        "rounds": rounds,
        "chosen_round": chosen + 1,
        "result": {
            "bytes": final["bytes"],
            "predicted_kl": final["predicted_kl"],
            "predicted_ppl_increase": 100 * math.expm1(final["predicted_kl"]),
            "measured_kl": final["measured"]["kl"],
            "measured_ppl_increase": final["measured"]["ppl_increase"],
            "measured_kl_upper": final["measured"]["kl_upper"],
            "measured_ppl_increase_upper": final["measured"]["ppl_increase_upper"],
            "confidence": final["measured"]["confidence"],
            "choices": dict(counts),
        },
        "uniform": uniform,
        "best_uniform": best and {"candidate": best["candidate"], "bytes": best["bytes"], "measured": best["measured"]},
        "bytes_saved_vs_best_uniform": best and best["bytes"] - final["bytes"],
        "frontier": curve,
        "layers": layers,
        "seconds": seconds,
    }
