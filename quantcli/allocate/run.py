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

import math
import time
from collections import Counter
from typing import Any

from quantcli.allocate.prepare import prepare
from quantcli.allocate.report import plot_allocation
from quantcli.allocate.rounds import compare_uniform, decide
from quantcli.allocate.search import (
    frontier,
)
from quantcli.formats.compressed_tensors.writer import compressed_result
from quantcli.quant.records import QuantizedModel, QuantizeRequest


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
