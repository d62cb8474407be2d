"""GPTQ's cost on SmolLM2 against the work it cannot avoid, timed in one process (issue 9's targets).

Runs ``quantcli.quantize`` with ``--method gptq`` at its defaults three ways on the same model and
calibration windows:

- ``baseline``: GPTQ's per-layer solver replaced by round-to-nearest, so what is timed is the
  unavoidable work (every block's forward passes over the calibration tokens, Hessian accumulation,
  rounding each layer once);
- ``plain``: GPTQ without clip search (``clip_search=False``);
- ``clip``: GPTQ at its defaults (clip search on).

Targets: clip at most 3x baseline, clip at most 1.5x plain. ``--blocks N`` times the first N decoder
blocks only (a cut copy of the model, written to a temporary folder) so a run fits a quiet minute;
the per-block work is the same in every block. Reports the quantize step's wall time and the
process CPU time of the whole call (steadier on a shared machine). Writes
``benchmarks/results/smollm2/gptq-speed.{json,md}``.

    HF_HUB_OFFLINE=1 python -m benchmarks.gptq_speed [--blocks 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.lib import setups
from benchmarks.lib.results import result_stem

MODES = ("baseline", "plain", "clip")


def cut_model(source: Path, blocks: int, folder: Path) -> Path:
    """``source`` with only its first ``blocks`` decoder blocks, saved to ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if blocks < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
        if getattr(model.config, "layer_types", None):  # per-block attention kinds, where the config lists them
            model.config.layer_types = model.config.layer_types[:blocks]
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def solver_replaced_by_rounding():
    """GPTQ's solver swapped for round-to-nearest on the same layout: the blocks, Hessians and rounding remain."""
    import quantcli.methods.gptq as gptq
    from quantcli.methods.rtn import round_to_nearest

    solver = gptq.gptq_quantize
    gptq.gptq_quantize = lambda matrix, hessian, layout, *args, **kwargs: (round_to_nearest(matrix, layout), [])
    try:
        yield
    finally:
        gptq.gptq_quantize = solver


def run(model: Path, mode: str, calibration, output: Path) -> dict:
    import quantcli
    from quantcli.config.quantize import QuantizeConfig

    config = QuantizeConfig(
        model=str(model),
        bits=4,
        method="gptq",
        output=output,
        force=True,
        eval=None,
        device="cpu",
        method_options={} if mode != "plain" else {"clip_search": False},
        calibration=calibration,
    )
    start, cpu = time.perf_counter(), time.process_time()
    with solver_replaced_by_rounding() if mode == "baseline" else contextlib.nullcontext():
        report = quantcli.quantize(config)
    return {
        "mode": mode,
        "quantize_seconds": round(report.timings["quantize"], 2),
        "call_seconds": round(time.perf_counter() - start, 2),
        "call_cpu_seconds": round(time.process_time() - cpu, 2),
        "options": report.options,
    }


def markdown(result: dict) -> str:
    lines = ["| mode | quantize step (s) | whole call (s) | whole call CPU (s) |", "|---|--:|--:|--:|"]
    lines += [
        f"| {row['mode']} | {row['quantize_seconds']:.1f} | {row['call_seconds']:.1f} | {row['call_cpu_seconds']:.1f} |"
        for row in result["rows"]
    ]
    ratios = result["ratios"]
    lines += [
        "",
        f"{result['model']}, first {result['blocks']} of 30 decoder blocks; gptq int4 at its defaults"
        f" ({json.dumps(result['rows'][-1]['options'])});"
        f" calibration {result['calibration']}; {result['threads']} torch threads, load average"
        f" {result['load_average']}.",
        "",
        f"- clip / baseline: {ratios['clip_vs_baseline_quantize']}x wall, {ratios['clip_vs_baseline_cpu']}x CPU"
        " (target at most 3x).",
        f"- clip / plain: {ratios['clip_vs_plain_quantize']}x wall, {ratios['clip_vs_plain_cpu']}x CPU (target at most"
        " 1.5x).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="Decoder blocks to keep (30 = the whole model).")
    parser.add_argument("--samples", type=int, default=128, help="Calibration windows (GPTQ's default).")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per calibration window (GPTQ's default).")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from quantcli.config.quantize import CalibrationConfig

    source = setups.model_folder("smollm2")
    calibration = CalibrationConfig(
        dataset=str(setups.WIKITEXT / "wiki.valid.calib.txt"), samples=args.samples, seq_len=args.seq_len
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = cut_model(source, args.blocks, Path(tmp) / "model")
        rows = []
        for mode in MODES:
            rows.append(run(model, mode, calibration, Path(tmp) / mode))
            print(json.dumps(rows[-1]), flush=True)
    by_mode = {row["mode"]: row for row in rows}
    ratios = {
        f"{a}_vs_{b}_{clock}": round(by_mode[a][key] / by_mode[b][key], 2)
        for a, b in (("clip", "baseline"), ("plain", "baseline"), ("clip", "plain"))
        for clock, key in (("quantize", "quantize_seconds"), ("cpu", "call_cpu_seconds"))
    }
    result = {
        "model": source.name,
        "blocks": args.blocks,
        "calibration": f"{args.samples} x {args.seq_len} tokens of wiki.valid.calib.txt, seed 0",
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "rows": rows,
        "ratios": ratios,
    }
    output = result_stem("smollm2", "gptq-speed")
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
