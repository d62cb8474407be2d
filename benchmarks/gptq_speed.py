"""GPTQ's cost on a real model against the work it cannot avoid, measured in one process.

Runs the block-by-block driver (:func:`quantcli.blockwise.quantize_blockwise`) three ways on the same
calibration windows: with a solver that does nothing (the unavoidable work: every block's forward
passes over the calibration tokens plus Hessian accumulation), plain GPTQ (``clip_search=False``) and
default GPTQ (clip search on), each on a fresh copy of the model. Reports wall time, the time spent
in the per-layer solver (wall and process CPU seconds: the CPU time is steadier on a shared
machine), and the ratios the targets name. Writes ``benchmarks/results/gptq_speed.json``.

``--quality`` instead quantizes the whole model (RTN and default GPTQ, INT4 at ``--group-size``
and INT8 per channel) and evaluates each on held-out WikiText-2 (16,384 tokens, windows of 512,
one stream joined by blank lines with one BOS): ``benchmarks/results/gptq_quality.json``.

    QUANTCLI_SMOLLM2=/path/to/SmolLM2-135M-Instruct PYTHONPATH=. HF_HUB_OFFLINE=1 \
        nice -n 10 python benchmarks/gptq_speed.py [--blocks 30 --bits 4 --group-size 128] [--quality]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "benchmarks" / "data" / "wikitext-2" / "wiki.valid.calib.txt"
EVAL = ROOT / "benchmarks" / "data" / "wikitext-2" / "wiki.valid.eval.txt"


def smollm2() -> Path:
    return Path(os.environ.get("QUANTCLI_SMOLLM2", ROOT / ".models" / "SmolLM2-135M-Instruct"))


def run(source: Path, blocks: int, calibration: torch.Tensor, bits: int, group_size: int | None, mode: str) -> dict:
    """One pass of the driver: ``mode`` is ``baseline`` (no solver), ``plain`` or ``clip``."""
    from quantcli import ops
    from quantcli.blockwise import quantize_blockwise
    from quantcli.intweights import plan_layouts
    from quantcli.gptq_solver import gptq_quantize
    from quantcli.models import load_model
    from quantcli.layers import select_modules, weight_matrix

    model = load_model(str(source), torch.float32, "cpu")
    model.model.layers = model.model.layers[:blocks]
    names = tuple(n for n in select_modules(model).names if n.startswith("model.layers."))
    plan = plan_layouts(model, names, bits, True, group_size, "minmax")
    modules = dict(model.named_modules())
    solver = [0.0, 0.0]
    output_error = {"gptq": 0.0, "rtn": 0.0}  # sum over layers of tr((W-Ŵ) H (W-Ŵ)ᵀ): the calibration output error

    def finish(name: str, hessian: torch.Tensor | None) -> None:
        if mode == "baseline" or hessian is None:
            return
        start, cpu = time.perf_counter(), time.process_time()
        layout, weight = plan[name][0], weight_matrix(modules[name])
        result, _ = gptq_quantize(weight, hessian, layout, act_order=True, clip_search=mode == "clip")
        solver[0] += time.perf_counter() - start
        solver[1] += time.process_time() - cpu
        for label, quantized in (("gptq", ops.dequantize(result.q, result.scale, result.zero_point, layout.group_size)),
                                 ("rtn", ops.fake_quantize(weight, layout.bits, layout.symmetric, layout.group_size))):
            error = weight - quantized
            output_error[label] += float(((error @ hessian) * error).sum())

    start, cpu = time.perf_counter(), time.process_time()
    stats = quantize_blockwise(model, names, calibration, finish)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"mode": mode, "seconds": round(total, 2), "cpu_seconds": round(total_cpu, 2), "solver_seconds": round(solver[0], 2),
            "solver_cpu_seconds": round(solver[1], 2),
            "output_error_vs_rtn": round(output_error["gptq"] / output_error["rtn"], 4) if output_error["rtn"] else None, "layers": len(names), "peak_rss_bytes": stats["peak_rss_bytes"],
            "layouts": {str(layout): sum(plan[n][0] == layout for n in names) for layout in {plan[n][0] for n in names}}}


def quality(source: Path, calibration: torch.Tensor, group_size: int, output: Path) -> None:
    """Perplexity of fp32, RTN and default GPTQ (INT4 g``group_size``, INT8 per channel) on held-out text."""
    from quantcli.config import EvalConfig
    from quantcli.methods import get_method
    from quantcli.methods.base import QuantizeRequest
    from quantcli.models import load_model, load_tokenizer
    from quantcli.layers import select_modules
    from quantcli.evaluation import measure_perplexity
    from quantcli.progress import NullProgress

    tokenizer = load_tokenizer(str(source))
    settings = EvalConfig(dataset=str(EVAL), seq_len=512, max_tokens=16384, bos="start")
    rows: list[dict] = []
    runs = [("fp32", None, 32, {}), (f"rtn int4 g{group_size}", "rtn", 4, {"group_size": group_size}),
            (f"gptq int4 g{group_size}", "gptq", 4, {"group_size": group_size}), ("rtn int8", "rtn", 8, {}), ("gptq int8", "gptq", 8, {})]
    for label, name, bits, options in runs:
        model = load_model(str(source), torch.float32, "cpu")
        row: dict = {"label": label}
        if name:
            method = get_method(name)
            done = [0]
            start, cpu = time.perf_counter(), time.process_time()

            def advance(count: int) -> None:
                done[0] += count
                if done[0] % 30 == 0:
                    print(f"{label}: {done[0]} layers in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

            request = QuantizeRequest(str(source), model, tokenizer, select_modules(model).names, "cpu", torch.float32,
                                      method.make_config(bits, options), calibration, progress=advance)
            quantized = method.quantize(request)
            model = quantized.model
            row.update(seconds=round(time.perf_counter() - start, 1), cpu_seconds=round(time.process_time() - cpu, 1),
                       per_channel_layers=sum(layer.group_size is None for layer in quantized.layers.values()), layers=len(quantized.layers))
        result = measure_perplexity(model, tokenizer, settings, NullProgress(), label)
        row.update(perplexity=round(result.perplexity, 4))
        rows.append(row)
        if rows[0]["label"] == "fp32":
            row["increase_percent"] = round(100 * (row["perplexity"] / rows[0]["perplexity"] - 1), 3)
        print(json.dumps(row), flush=True)
        output.write_text(json.dumps({"model": source.name, "eval": f"{EVAL.name}: 16384 tokens, seq_len 512, bos start",
                                      "calibration": f"{CALIB.name} {calibration.shape[0]} x {calibration.shape[1]} seed 0",
                                      "machine": f"{os.cpu_count()} cores, shared with other jobs", "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30, help="Decoder blocks to run (the model is cut after them).")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--modes", default="baseline,plain,clip")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's); 1 avoids spinning threads on a busy machine.")
    parser.add_argument("--quality", action="store_true", help="Perplexity of RTN and GPTQ instead of timings.")
    parser.add_argument("--output", type=Path, help="Default benchmarks/results/gptq_speed.json (gptq_quality.json with --quality).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from quantcli.data import calibration_batch, read_documents
    from quantcli.models import load_tokenizer

    source = smollm2()
    calibration = calibration_batch(read_documents(str(CALIB)), load_tokenizer(str(source)), args.samples, args.seq_len, 0)
    results = ROOT / "benchmarks" / "results"
    if args.quality:
        quality(source, calibration, args.group_size, args.output or results / "gptq_quality.json")
        return
    rows = []
    for mode in args.modes.split(","):
        rows.append(run(source, args.blocks, calibration, args.bits, args.group_size, mode))
        print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    for clock in ("seconds", "cpu_seconds"):  # CPU time is the steadier clock on a shared machine
        by_mode = {row["mode"]: row[clock] for row in rows}
        pairs = [(m, "baseline") for m in ("plain", "clip")] + [("clip", "plain")]
        ratios.update({f"{a}_vs_{b}_{clock}": round(by_mode[a] / by_mode[b], 2) for a, b in pairs if a in by_mode and b in by_mode})
    result = {"model": source.name, "blocks": args.blocks, "calibration": f"{CALIB.name} {args.samples} x {args.seq_len} seed 0",
              "bits": args.bits, "group_size": args.group_size, "act_order": True, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
              "rows": rows, "ratios": ratios}
    print(json.dumps(ratios))
    (args.output or results / "gptq_speed.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
