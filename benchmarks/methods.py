"""Compare quantization methods on one model, in one process.

Calibrates on the setup's calibration text, evaluates every checkpoint (reloaded from disk with
``quantcli.load``) on its evaluation text with the same settings, and writes PREFIX.json and
PREFIX.md: perplexity, its change against fp32, size on disk and time to quantize. The model and
data come from ``--model`` (see ``benchmarks/lib/setups.py``): the embedded stories260K by default,
``--model smollm2`` for the real-model table (results/smollm2/methods.*).

Calibrated methods run once per calibration seed (``--seeds``): GPTQ's rounding decisions cascade,
so a different draw of windows (or even a different thread count, which reorders float sums) moves
the result; rows give the mean and the spread. llm-compressor's GPTQ runs on the same windows as an
independent reference where it is installed (``benchmarks/lib/reference_gptq.py``).

``--only PATTERN`` (glob over row labels, repeatable) runs some rows; the other rows of an existing
result file with the same settings are kept, so slow rows can be added later, by several runs at once
(the file is merged under a lock after every seed). ``--first-seed K`` adds seeds K.. to a row's
earlier ones (same options), so a 5-seed sweep can be spread over runs.

    PYTHONPATH=.reference python -m benchmarks.methods [--seeds 5]
    python -m benchmarks.methods --model smollm2 --only 'rtn*' --only 'bnb*'
    PYTHONPATH=.reference python -m benchmarks.methods --model smollm2 --only 'gptq*' --only 'llm-compressor*' --seeds 5
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import quantcli
from benchmarks.lib import setups
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.errors import InputError
from quantcli.measure.evaluation import measure_perplexity
from quantcli.methods import get_method
from quantcli.progress import NullProgress
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import bytes_on_disk, weight_files

DEMO_RUNS = [  # label, method, bits, options (gptq: act-order with static groups and clip search unless stated)
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
    ("gptq int4 g32 no clip search", "gptq", 4, {"group_size": 32, "clip_search": False}),
    ("gptq int4 g64 no clip search", "gptq", 4, {"group_size": 64, "clip_search": False}),
    ("gptq int4 g32 no act-order", "gptq", 4, {"group_size": 32, "act_order": False}),
    ("gptq int3 g32", "gptq", 3, {"group_size": 32}),
]
GROUPS = [("g128", 128), ("g64", 64), ("g32", 32), ("per-channel", -1)]
REAL_RUNS = [  # every bit width at every grouping, for RTN (cheap) and GPTQ; bitsandbytes at its own formats
    *[(f"rtn int{bits} {name}", "rtn", bits, {"group_size": size}) for bits in (8, 4, 3) for name, size in GROUPS],
    ("rtn int4 g32 asymmetric", "rtn", 4, {"group_size": 32, "symmetric": False}),
    ("rtn int4 g128 minmax", "rtn", 4, {"group_size": 128, "observer": "minmax"}),  # llm-compressor's grid (absmax/7.5)
    ("bnb-int8", "bnb-int8", 8, {}),
    ("bnb-nf4", "bnb-nf4", 4, {}),
    *[(f"gptq int{bits} {name}", "gptq", bits, {"group_size": size}) for bits in (8, 4, 3) for name, size in GROUPS],
    ("gptq int4 g128 no clip search", "gptq", 4, {"group_size": 128, "clip_search": False}),
    ("gptq int4 g128 minmax", "gptq", 4, {"group_size": 128, "observer": "minmax"}),
    (
        "gptq int4 g128 minmax no clip search",
        "gptq",
        4,
        {"group_size": 128, "observer": "minmax", "clip_search": False},
    ),  # llm-compressor's settings
    ("gptq-nf4 (GPTQ on bnb's NF4 grid)", "gptq-nf4", 4, {}),
]
REFERENCE_RUNS = [  # label, bits, group size: llm-compressor's GPTQ on the same windows
    ("llm-compressor gptq int4 g32", 4, 32),
    ("llm-compressor gptq int4 per-channel", 4, None),
]
REAL_REFERENCE_RUNS = [("llm-compressor gptq int4 g128", 4, 128), *REFERENCE_RUNS]


def unavailable(method: str, device: str) -> str | None:
    try:
        return get_method(method).unavailable_reason(device)
    except InputError:
        return f"no method named {method} is registered"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument(
        "--output", type=Path, help="Writes OUTPUT.json and OUTPUT.md (default: results/<model>/methods)."
    )
    parser.add_argument("--calib-samples", type=int, default=128, help="Calibration windows.")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="Tokens per calibration window.")
    parser.add_argument("--seeds", type=int, default=5, help="Calibration seeds (0..N-1) for calibrated methods.")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="First calibration seed; rows add to the seeds an earlier run stored for them.",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="Run only rows whose label matches this glob (repeatable)."
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    args = parser.parse_args()
    setup = setups.resolve(args)
    output = args.output or setup.output("methods")
    evaluation = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=setup.max_tokens)
    calibration = CalibrationConfig(dataset=setup.calib_dataset, samples=args.calib_samples, seq_len=args.calib_seq_len)
    settings = {
        "model": setup.label,
        "model_path": setup.path,
        "calibration": vars(calibration),
        "eval": vars(evaluation),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "caveat": setup.caveat,
    }
    runs, references = (DEMO_RUNS, REFERENCE_RUNS) if setup.name == setups.DEMO else (REAL_RUNS, REAL_REFERENCE_RUNS)
    wanted = lambda label: not args.only or any(fnmatch.fnmatchcase(label, glob) for glob in args.only)  # noqa: E731
    kept = previous_rows(output, settings)
    rows = [kept["fp32"]] if "fp32" in kept else []  # the baseline every row's change is against

    def perplexity(folder: Path | str) -> float:
        model, tokenizer, _ = quantcli.load(folder, device=args.device)
        return measure_perplexity(model, tokenizer, evaluation, NullProgress(), str(folder)).perplexity

    def save(row: dict | None = None) -> None:
        """Merge this run's rows into the file under a lock, so several runs (``--only``) can fill one table at once."""
        if row is not None:
            rows.append(row)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            earlier = previous_rows(output, settings)
            order = ["fp32", *(label for label, *_ in runs), *(label for label, *_ in references)]
            table = [with_earlier_seeds(row, earlier.get(row["label"])) for row in rows]
            table += [row for label, row in earlier.items() if label not in {row["label"] for row in rows}]
            table.sort(key=lambda row: order.index(row["label"]) if row["label"] in order else len(order))
            summarize(table)
            output.with_suffix(".json").write_text(
                json.dumps({"settings": settings, "rows": table}, indent=2, default=str) + "\n"
            )
            output.with_suffix(".md").write_text(markdown(table, settings))

    if not rows:
        save(
            {
                "label": "fp32",
                "method": "none",
                "bits": 32,
                "perplexities": [perplexity(setup.path)],
                "disk_bytes": bytes_on_disk(weight_files(setup.path)),
                "quantize_seconds": None,
            }
        )
        print(f"fp32: ppl {rows[0]['perplexities'][0]:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, bits, options in runs:
            if not wanted(label):
                continue
            reason = unavailable(method, args.device)
            if reason:
                print(f"{label}: not available: {reason}")
                save({"label": label, "method": method, "bits": bits, "not_available": reason})
                continue
            row = {
                "label": label,
                "method": method,
                "bits": bits,
                "seeds": [],
                "perplexities": [],
                "stats": [],
                "quantize_seconds_each": [],
                "threads_each": [],
            }
            rows.append(row)
            first = args.first_seed if get_method(method).needs_calibration else 0
            for seed in range(first, first + args.seeds if get_method(method).needs_calibration else 1):
                folder = Path(tmp) / label.replace(" ", "-")
                report = quantcli.quantize(
                    QuantizeConfig(
                        model=setup.path,
                        bits=bits,
                        method=method,
                        output=folder,
                        method_options=options,
                        force=True,
                        calibration=CalibrationConfig(**{**vars(calibration), "seed": seed}),
                        eval=None,
                        device=args.device,
                    )
                )
                row["seeds"].append(seed)
                row["perplexities"].append(perplexity(folder))
                row["stats"].append(report.stats)
                row["quantize_seconds_each"].append(report.timings["quantize"])
                row["threads_each"].append(torch.get_num_threads())
                row.update(
                    options=report.options, disk_bytes=report.size["quantized_disk_bytes"], fallbacks=report.fallbacks
                )
                print(f"{label} seed {seed}: ppl {row['perplexities'][-1]:.4f}", flush=True)
                save()  # after every seed: a stopped run keeps the seeds it finished
        for row in reference_rows(
            setup.path,
            [run for run in references if wanted(run[0])],
            Path(tmp),
            calibration,
            range(args.first_seed, args.first_seed + args.seeds),
            perplexity,
        ):
            save(row)
    save()  # re-renders the merged table even when no row ran (``--only none``)
    print(output.with_suffix(".md").read_text())


def previous_rows(output: Path, settings: dict) -> dict[str, dict]:
    """The rows of earlier runs into ``output`` with the same model, data and device (else none); each row keeps
    its own seeds."""
    try:
        previous = json.loads(output.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}

    def comparable(run: dict) -> list:  # the datasets by file name: the same text from another checkout is the same
        def named(part: object) -> object:
            return {**part, "dataset": Path(str(part.get("dataset"))).name} if isinstance(part, dict) else part

        return [
            named(json.loads(json.dumps(run.get(key), default=str)))
            for key in ("model", "calibration", "eval", "device")
        ]

    if comparable(previous.get("settings", {})) != comparable(settings):
        return {}
    rows = {row["label"]: row for row in previous.get("rows", [])}
    for row in rows.values():  # rows from before per-seed thread counts ran at the file's one count
        if "quantize_seconds_each" in row and "threads_each" not in row:
            row["threads_each"] = [row.get("threads", previous["settings"].get("threads"))] * len(
                row["quantize_seconds_each"]
            )
    return rows


def with_earlier_seeds(row: dict, earlier: dict | None) -> dict:
    """``row`` plus the seeds an earlier run measured for the same label and options (its own seeds win)."""
    if (
        not earlier
        or "seeds" not in row
        or earlier.get("options") != row.get("options")
        or "perplexities" not in earlier
    ):
        return row
    merged = dict(row)
    extra = [i for i, seed in enumerate(earlier.get("seeds", [])) if seed not in row["seeds"]]
    for key in ("seeds", "perplexities", "stats", "quantize_seconds_each", "threads_each"):
        if key in earlier:
            merged[key] = [earlier[key][i] for i in extra] + list(row.get(key, []))
    return merged


def reference_rows(
    model: str,
    runs: list[tuple[str, int, int | None]],
    tmp: Path,
    calibration: CalibrationConfig,
    seeds: range,
    perplexity: Callable[[Path], float],
) -> list[dict]:
    """llm-compressor's GPTQ on quantcli's windows for each seed, or why it cannot run here."""
    if not runs:
        return []
    try:
        import llmcompressor  # noqa: F401

        from benchmarks.lib import reference_gptq
    except ImportError as error:
        reason = f"llm-compressor not installed ({error.name}); make bench-methods installs it into .reference"
        return [
            {"label": label, "method": "reference", "bits": bits, "not_available": reason} for label, bits, _ in runs
        ]
    from transformers import AutoTokenizer

    documents, tokenizer = read_documents(calibration.dataset), AutoTokenizer.from_pretrained(model)
    rows = []
    for label, bits, group_size in runs:
        row = {
            "label": label,
            "method": "reference",
            "bits": bits,
            "options": {"group_size": group_size, "symmetric": True, "observer": "minmax"},
            "seeds": [],
            "perplexities": [],
            "quantize_seconds_each": [],
            "threads_each": [],
        }
        for seed in seeds:
            windows = calibration_batch(documents, tokenizer, calibration.samples, calibration.seq_len, seed)
            output = tmp / f"{label.replace(' ', '-')}-{seed}"
            start = time.perf_counter()
            reference_gptq.quantize(model, windows, bits, group_size, output)
            row["quantize_seconds_each"].append(time.perf_counter() - start)
            row["threads_each"].append(torch.get_num_threads())
            row["seeds"].append(seed)
            row["perplexities"].append(perplexity(output))
            row["disk_bytes"] = bytes_on_disk(weight_files(str(output)))
            print(f"{label} seed {seed}: ppl {row['perplexities'][-1]:.4f}", flush=True)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> None:
    """Mean perplexity and its change against fp32 (per seed too) for every row that ran."""
    base = rows[0]["perplexities"][0]
    for row in rows:
        if "perplexities" in row:
            row["perplexity"] = statistics.fmean(row["perplexities"])
            row["deltas"] = [p - base for p in row["perplexities"]]
            row["delta"] = row["perplexity"] - base
            row["delta_percent"] = 100 * row["delta"] / base
            row["delta_percents"] = [100 * d / base for d in row["deltas"]]
            row["delta_percent_sd"] = statistics.stdev(row["delta_percents"]) if len(row["deltas"]) > 1 else None
            seconds = row.get("quantize_seconds_each")
            row["quantize_seconds"] = statistics.median(seconds) if seconds else None


def markdown(rows: list[dict], settings: dict) -> str:
    calib, evaluation = settings["calibration"], settings["eval"]
    lines = [
        f"{settings['model']} on {settings['device']}; calibration {calib['samples']} x"
        f" {calib['seq_len']} tokens of {Path(calib['dataset']).name}, calibrated methods over the seeds column's"
        " count of calibration seeds"
        f" (mean ± sd and range); perplexity on {evaluation['max_tokens']} tokens of {Path(evaluation['dataset']).name}"
        f" (seq_len {evaluation['seq_len']}, stride {evaluation['stride'] or evaluation['seq_len']}, BOS per"
        f" {evaluation['bos']})." + (f" Caveat: {settings['caveat']}" if settings.get("caveat") else ""),
        "",
        "| method | perplexity | Δ ppl | Δ % | seeds | spread over seeds | size on disk | quantize time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "not_available" in row:
            lines.append(f"| {row['label']} | not available: {row['not_available']} | | | | | | |")
            continue
        seconds = quantize_times(row)
        spread = ""
        if row["delta_percent_sd"] is not None:
            low, high = min(row["delta_percents"]), max(row["delta_percents"])
            spread = f"± {row['delta_percent_sd']:.2f} ({low:+.2f} to {high:+.2f}%)"
        seeds = len(row.get("seeds") or []) or ""
        lines.append(
            f"| {row['label']} | {row['perplexity']:.4f} | {row['delta']:+.4f} | {row['delta_percent']:+.2f}% |"
            f" {seeds} | {spread} |"
            f" {row['disk_bytes'] / 1024:.0f} KiB | {seconds} |"
        )
    lines += [""] + acceptance(rows) + fallback_notes(rows)
    return "\n".join(lines) + "\n"


def quantize_times(row: dict) -> str:
    """The median time to quantize at each thread count the row's seeds ran with (threads change the time, not
    the work)."""
    by_threads: dict[int | None, list[float]] = {}
    for seconds, threads in zip(row.get("quantize_seconds_each") or [], row.get("threads_each") or []):
        by_threads.setdefault(threads, []).append(seconds)
    return ", ".join(
        f"{statistics.median(times):.1f} s" + (f" ({threads} thr)" if threads else "")
        for threads, times in sorted(by_threads.items(), key=lambda item: -(item[0] or 0))
    )


def acceptance(rows: list[dict]) -> list[str]:
    """GPTQ's (and the reference's) perplexity increase as a fraction of RTN's at the same grouping and observer."""
    grid = lambda row: (row["options"].get("group_size") or -1, row["options"].get("observer"))  # noqa: E731 (the reference: None per channel)
    rtn = {
        grid(row): row
        for row in rows
        if row["method"] == "rtn" and row["bits"] == 4 and "delta" in row and row["options"].get("symmetric", True)
    }
    nf4 = next((row for row in rows if row["method"] == "bnb-nf4" and "delta" in row), None)
    lines = []
    for row in rows:
        baseline = rtn.get(grid(row)) if "options" in row else None
        if row["method"] in ("gptq", "reference") and row["bits"] == 4 and "delta" in row and baseline:
            ratios = [delta / baseline["delta"] for delta in row["deltas"]]
            versus_nf4 = f"; {'below' if nf4 and row['delta'] < nf4['delta'] else 'not below'} bnb-nf4's" if nf4 else ""
            lines.append(
                f"- {row['label']}: perplexity increase {row['delta'] / baseline['delta']:.2f}x that of"
                f" {baseline['label']}"
                f" (per seed {min(ratios):.2f}-{max(ratios):.2f}x){versus_nf4}."
            )
    return lines


def fallback_notes(rows: list[dict]) -> list[str]:
    """Rows whose layer map stores some layers differently from the row's label (e.g. a group size that does not
    divide)."""
    lines = []
    for row in rows:
        notes = sorted(set((row.get("fallbacks") or {}).values()))
        if notes:
            lines.append(
                f"- {row['label']}: {len(row['fallbacks'])} layer(s) stored otherwise: {'; '.join(notes)[:300]}"
            )
    return ["", "Layer-map fallbacks:", *lines] if lines else []


if __name__ == "__main__":
    main()
