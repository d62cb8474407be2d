"""Compare quantization methods on the embedded stories260K, in one process.

Calibrates on ``tinystories:calib``, evaluates every checkpoint (reloaded from disk with
``quantcli.load``) on ``tinystories:eval`` with the same settings, and writes PREFIX.json and
PREFIX.md: perplexity, its change against fp32, size on disk and time to quantize.

    python benchmarks/methods.py
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import quantcli
from quantcli.config import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.errors import InputError
from quantcli.methods import get_method
from quantcli.models import EMBEDDED_MODEL, bytes_on_disk, weight_files
from quantcli.pipeline import measure_perplexity
from quantcli.progress import NullProgress

RUNS = [  # label, method, bits, options (gptq: act-order with static groups unless stated)
    ("cast bf16", "cast", 16, {}),
    ("rtn int8", "rtn", 8, {}),
    ("bnb-int8", "bnb-int8", 8, {}),
    ("rtn int4 g32", "rtn", 4, {"group_size": 32}),
    ("rtn int4 g64", "rtn", 4, {"group_size": 64}),
    ("rtn int4 per-channel", "rtn", 4, {"group_size": -1}),
    ("rtn int4 g32 mse", "rtn", 4, {"group_size": 32, "observer": "mse"}),
    ("bnb-nf4", "bnb-nf4", 4, {}),
    ("gptq-nf4 (GPTQ on bnb's NF4 grid)", "gptq-nf4", 4, {}),
    ("gptq int4 g32", "gptq", 4, {"group_size": 32}),
    ("gptq int4 g64", "gptq", 4, {"group_size": 64}),
    ("gptq int4 per-channel", "gptq", 4, {"group_size": -1}),
    ("gptq int4 g32 no act-order", "gptq", 4, {"group_size": 32, "act_order": False}),
    ("gptq int3 g32", "gptq", 3, {"group_size": 32}),
]


def unavailable(method: str, device: str) -> str | None:
    try:
        return get_method(method).unavailable_reason(device)
    except InputError:
        return f"no method named {method} is registered"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "methods", help="Writes OUTPUT.json and OUTPUT.md.")
    parser.add_argument("--max-tokens", type=int, default=32768, help="Evaluation tokens.")
    parser.add_argument("--calib-samples", type=int, default=128, help="Calibration windows.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per calibration and evaluation window.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    args = parser.parse_args()
    evaluation = EvalConfig(seq_len=args.seq_len, max_tokens=args.max_tokens)
    calibration = CalibrationConfig(samples=args.calib_samples, seq_len=args.seq_len)

    def perplexity(folder: Path | str) -> float:
        model, tokenizer, _ = quantcli.load(folder, device=args.device)
        return measure_perplexity(model, tokenizer, evaluation, NullProgress(), str(folder)).perplexity

    rows = [{"label": "fp32", "method": "none", "bits": 32, "perplexity": perplexity(EMBEDDED_MODEL),
             "disk_bytes": bytes_on_disk(weight_files(str(EMBEDDED_MODEL))), "quantize_seconds": None}]
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, bits, options in RUNS:
            reason = unavailable(method, args.device)
            if reason:
                print(f"{label}: not available: {reason}")
                rows.append({"label": label, "method": method, "bits": bits, "not_available": reason})
                continue
            output = Path(tmp) / label.replace(" ", "-")
            report = quantcli.quantize(QuantizeConfig(
                bits=bits, method=method, output=output, method_options=options,
                calibration=calibration, eval=None, device=args.device,
            ))
            rows.append({
                "label": label, "method": method, "bits": bits, "options": report.options,
                "perplexity": perplexity(output), "disk_bytes": report.size["quantized_disk_bytes"],
                "quantize_seconds": report.timings["quantize"], "stats": report.stats, "fallbacks": report.fallbacks,
            })
            print(f"{label}: ppl {rows[-1]['perplexity']:.4f}")
    base = rows[0]["perplexity"]
    for row in rows:
        if "perplexity" in row:
            row["delta"] = row["perplexity"] - base
            row["delta_percent"] = 100 * row["delta"] / base
    settings = {"model": "stories260K", "calibration": vars(calibration), "eval": vars(evaluation), "device": args.device,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=str) + "\n")
    args.output.with_suffix(".md").write_text(markdown(rows, settings))
    print(markdown(rows, settings))


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        f"stories260K on {settings['device']}; calibration {settings['calibration']['samples']} x {settings['calibration']['seq_len']}"
        f" tokens of tinystories:calib; perplexity on {settings['eval']['max_tokens']} tokens of tinystories:eval (seq_len {settings['eval']['seq_len']}).",
        "",
        "| method | perplexity | Δ ppl | Δ % | size on disk | quantize time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "not_available" in row:
            lines.append(f"| {row['label']} | not available: {row['not_available']} | | | | |")
            continue
        seconds = "" if row["quantize_seconds"] is None else f"{row['quantize_seconds']:.1f} s"
        lines.append(f"| {row['label']} | {row['perplexity']:.4f} | {row['delta']:+.4f} | {row['delta_percent']:+.2f}% | {row['disk_bytes'] / 1024:.0f} KiB | {seconds} |")
    rtn = {row["options"]["group_size"]: row for row in rows if row["method"] == "rtn" and row["bits"] == 4 and "delta" in row and row["options"]["observer"] == "minmax"}
    nf4 = next((row for row in rows if row["method"] == "bnb-nf4" and "delta" in row), None)
    lines.append("")
    for row in rows:
        baseline = rtn.get(row.get("options", {}).get("group_size"))
        if row["method"] == "gptq" and row["bits"] == 4 and baseline:
            versus_nf4 = f"; {'below' if nf4 and row['delta'] < nf4['delta'] else 'not below'} bnb-nf4's" if nf4 else ""
            lines.append(f"- {row['label']}: perplexity increase {row['delta'] / baseline['delta']:.2f}x that of {baseline['label']}{versus_nf4}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
