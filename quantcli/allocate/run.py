"""``allocate``: what the pipeline calls instead of the method's ``quantize`` when a target is set.

Quality targets (``--target-ppl-increase``, ``--target-kl``) are budgets of predicted KL: the solve
minimises bytes within it, the verification text measures the result, and the budget is scaled by
target/measured until a round meets the target with little to spare (``max_rounds`` at most; the
smallest result that met it is kept). Size targets (``--target-size``, ``--target-bpw``) minimise
predicted KL within the exact byte count; the verification text then only reports the quality.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from typing import Any

from quantcli.allocate.candidates import checkpoint_bytes, parse_candidates
from quantcli.allocate.search import Verifier, _layouts, _predicted, _solve, _windows, assemble, frontier, layer_options, probe, size_choice, uniform_choices
from quantcli.allocate.sensitivity import hessians, output_fisher
from quantcli.errors import GateFailedError
from quantcli.methods.base import QuantizedModel, QuantizeRequest

ENOUGH = 0.8  # a round that meets the target using at least this share of it ends the search


def _met(kind: str, value: float, measured: dict[str, float], total: int, target_bytes: int | None) -> bool:
    if kind == "kl":
        return measured["kl"] <= value
    if kind == "ppl_increase":
        return measured["ppl_increase"] <= value
    return total <= target_bytes


def _as_kl(kind: str, measured: dict[str, float]) -> float:
    """The measured loss in the budget's unit (nats/token): KL, or log of the perplexity ratio."""
    return measured["kl"] if kind == "kl" else math.log1p(measured["ppl_increase"] / 100)


def allocate(request: QuantizeRequest, method: str, config: Any, progress: Any) -> QuantizedModel:
    """Quantize ``request.model`` in place with a per-layer allocation meeting ``config.allocation``'s target."""
    from quantcli.data import read_documents
    from quantcli.formats.compressed_tensors import compressed_result
    from quantcli.models import parameter_count

    alloc, calib, model = config.allocation, config.calibration, request.model
    kind, value = alloc.target
    candidates = parse_candidates(list(alloc.candidates))
    search_spec = alloc.search_dataset or calib.dataset
    verify_spec = alloc.verify_dataset or (config.eval.dataset if config.eval is not None else calib.dataset)
    search_source, verify_source = read_documents(search_spec, calib.text_column), read_documents(verify_spec, calib.text_column)
    seq_len = config.eval.seq_len if config.eval is not None else calib.seq_len
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    base = copy.deepcopy(model).eval()
    with progress.task("allocation: Hessians and output Fisher", total=None):
        found = hessians(model, request.layers, request.calibration)
        fisher = output_fisher(model, request.layers, request.calibration[: alloc.fisher_samples], calib.seed)
    seconds["sensitivity"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress.task(f"allocation: {len(candidates)} candidates per layer ({method})", total=len(request.layers)) as advance:
        table = layer_options(model, request.layers, candidates, method, request.config, found, fisher, lambda n: (advance(n), request.progress(n)))
    del found
    seconds["candidates"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress.task("allocation: proxy check on the search text", total=None):
        check = probe(model, base, table, _windows(search_source, request.tokenizer, alloc.search_tokens, calib.seq_len, "search"), alloc.probe_layers)
    for options in table.values():
        for option in options:
            option.predicted = check["scale"] * option.proxy
    verify = Verifier(base, _windows(verify_source, request.tokenizer, alloc.verify_tokens, seq_len, "verification"), verify_spec)
    seconds["proxy_check"] = time.perf_counter() - start

    start = time.perf_counter()
    target_bytes = value if kind == "size" else math.floor(value * parameter_count(model) / 8) if kind == "bpw" else None
    rounds: list[dict[str, Any]] = []
    tried: list[dict[str, int]] = []
    if target_bytes is not None:
        tried.append(size_choice(model, table, target_bytes))
    budget = value if kind == "kl" else math.log1p(value / 100)
    with progress.task("allocation: solve and verify", total=None):
        for number in range(alloc.max_rounds if target_bytes is None else 1):
            choice = tried[-1] if target_bytes is not None else _solve(table, budget, by_size=False)
            if target_bytes is None and choice in tried:
                break
            tried += [] if target_bytes is not None else [choice]
            assemble(model, base, table, choice)
            total = checkpoint_bytes(model, _layouts(table, choice))
            measured = verify(model)
            met = _met(kind, value, measured, total, target_bytes)
            rounds.append({"round": number + 1, "budget_kl": None if target_bytes else budget, "predicted_kl": _predicted(table, choice),
                           "bytes": total, "measured": measured, "met": met})
            if target_bytes is not None:
                break
            got = _as_kl(kind, measured)
            if met and got >= ENOUGH * budget_target(kind, value):
                break
            budget *= min(max(budget_target(kind, value) / got if got > 0 else 4.0, 0.25), 4.0) * (1.0 if met else 0.95)
    passing = [(r["bytes"], i) for i, r in enumerate(rounds) if r["met"]]
    if not passing:
        best = min(rounds, key=lambda r: _as_kl(kind, r["measured"]))
        raise GateFailedError(
            f"allocation missed --target-{kind.replace('_', '-')} {value:g} on the verification text after {len(rounds)} round(s)"
            f" (closest: KL {best['measured']['kl']:.5f}, perplexity {best['measured']['ppl_increase']:+.2f}%, {best['bytes'] / 1e6:.3f} MB)."
            " Loosen the target, add candidates (keep, int8), or raise max_rounds."
        )
    chosen = min(passing)[1]
    choice = tried[chosen]
    seconds["solve_verify"] = time.perf_counter() - start

    start = time.perf_counter()
    uniform = []
    schemes = [(checkpoint_bytes(model, _layouts(table, picks)), name, picks) for name, picks in uniform_choices(table, candidates).items() if name != "keep"]
    # measured from the smallest up until one meets a quality target; for a size target, from the largest that fits down
    order = sorted(schemes) if target_bytes is None else sorted((s for s in schemes if s[0] <= target_bytes), reverse=True)
    for total, name, picks in order:
        assemble(model, base, table, picks)
        measured = verify(model)
        uniform.append({"candidate": name, "bytes": total, "predicted_kl": _predicted(table, picks), "measured": measured, "met": _met(kind, value, measured, total, target_bytes)})
        if uniform[-1]["met"]:
            break
    measured_names = {u["candidate"] for u in uniform}
    uniform += [{"candidate": name, "bytes": total, "predicted_kl": _predicted(table, picks), "measured": None, "met": None}
                for total, name, picks in schemes if name not in measured_names]
    seconds["uniform"] = time.perf_counter() - start
    assemble(model, base, table, choice)
    del base

    layers, records, notes = {}, {}, {}
    for name, index in choice.items():
        option = table[name][index]
        layers[name] = {"choice": option.names[0], "same_as": option.names[1:], "bits": option.layout.bits if option.layout else None,
                        "group_size": option.layout.group_size if option.layout else None, "bytes": option.bytes, "predicted_kl": option.predicted}
        if option.weights is not None:
            records[name], notes[name] = option.weights, list(option.notes)
    summary = _summary(kind, value, target_bytes, method, candidates, (calib.dataset, search_spec, verify_spec), alloc, check, rounds, chosen,
                       verify.base_perplexity, layers, uniform, frontier(model, table), seconds)
    weights = Counter()
    for name, record in records.items():
        weights[record.layout.bits] += record.q.numel()
    bits = weights.most_common(1)[0][0] if weights else config.bits
    options = {key: val for key, val in request.config.grid_options().items() if key != "group_size"}
    options.update({"method_options": {k: v for k, v in vars(request.config).items() if k not in ("bits", "group_size")}} if method == "gptq" else {})
    options["allocation"] = {"target": summary["target"], "candidates": summary["candidates"]}
    if alloc.plot:
        from pathlib import Path

        from quantcli.allocate.report import plot_allocation

        plot_allocation(summary, Path(alloc.plot))
    return compressed_result(model, method, bits, options, records, notes, {"allocation": summary})


def budget_target(kind: str, value: float) -> float:
    return value if kind == "kl" else math.log1p(value / 100)


def _summary(kind, value, target_bytes, method, candidates, texts, alloc, check, rounds, chosen, base_ppl, layers, uniform, curve, seconds) -> dict[str, Any]:  # noqa: ANN001
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
        "texts": {"calibration": texts[0], "search": texts[1], "verify": texts[2], "search_tokens": check["tokens"], "verify_tokens": final["measured"]["tokens"],
                  "verify_base_perplexity": base_ppl},
        "proxy_check": check,
        "rounds": rounds,
        "chosen_round": chosen + 1,
        "result": {"bytes": final["bytes"], "predicted_kl": final["predicted_kl"], "predicted_ppl_increase": 100 * math.expm1(final["predicted_kl"]),
                   "measured_kl": final["measured"]["kl"], "measured_ppl_increase": final["measured"]["ppl_increase"], "choices": dict(counts)},
        "uniform": uniform,
        "best_uniform": best and {"candidate": best["candidate"], "bytes": best["bytes"], "measured": best["measured"]},
        "bytes_saved_vs_best_uniform": best and best["bytes"] - final["bytes"],
        "frontier": curve,
        "layers": layers,
        "seconds": seconds,
    }
