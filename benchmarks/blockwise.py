"""Block-wise methods beyond GPTQ on SmolLM2 (issue 26 items 2 and 3a): gptq, GPTAQ (``target:
full-precision``) and blockround (GPTQ, then each block's rounding tuned against the full-precision block),
on the held-out protocol (:mod:`benchmarks.lib.heldout`), one row per call so that each run fits the shared
CPU lock, rows merged into ``benchmarks/results/smollm2/blockwise.{json,md}``.

    python -m benchmarks.blockwise --rows gptq-w4g128 blockround-w4g128
    python -m benchmarks.blockwise --timing 4    # quantize time against gptq's, first 4 blocks, one process

Compressed-tensors rows keep the embedding 16-bit (the default) and are scored by quantcli's eval; GGUF rows
(``--format gguf``) are scored by llama.cpp on quantcli's token ids, their increase against the F32 GGUF's
llama.cpp perplexity (row ``f32-gguf``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.heldout import SETTINGS, calibration_config, calibration_windows, score_checkpoint
from benchmarks.lib.results import result_stem
from tests.support.models import smollm2_folder

FP32_PERPLEXITY = 45.996  # SmolLM2 fp32 on this protocol (transformers)
F32_GGUF_PERPLEXITY = 45.997  # llama.cpp, F32 GGUF, this protocol (benchmarks/anchors.py; row f32-gguf remeasures)
Row = tuple[str, str, dict[str, Any], str | None]  # method, grid, options (bits included), GGUF type


def _ints(method: str, bits: int, group: int, **options: Any) -> Row:
    """A compressed-tensors row: integer groups of ``group`` at ``bits``."""
    return method, f"W{bits} g{group}", {"bits": bits, "group_size": group, **options}, None


def _gguf(method: str, kind: str, bits: int = 4, **options: Any) -> Row:
    """A GGUF row of type ``kind``, scored by llama.cpp."""
    return method, kind, {"bits": bits, **options}, kind


B4 = {"iterations": 32, "batch": 4}  # blockround's defaults since 2026-12-07, spelled out in its rows
FORMER = {"iterations": 16, "batch": 8}  # its defaults until then, rerun on today's code
FP = {"target": "full-precision"}  # GPTAQ
RTN_RECIPE = {"iterations": 200, "scales": True, "start": "rtn"}  # AutoRound's default recipe in quantcli
ROWS: dict[str, Row] = {
    "gptq-w4g128": _ints("gptq", 4, 128),
    "gptaq-w4g128": _ints("gptq", 4, 128, **FP),
    "blockround-w4g128": _ints("blockround", 4, 128),
    "blockround-gptaq-w4g128": _ints("blockround", 4, 128, **FP),
    "blockround-64it-w4g128": _ints("blockround", 4, 128, iterations=64),
    "blockround-200it-w4g128": _ints("blockround", 4, 128, iterations=200),
    **{f"blockround-b4-32it-w{b}g{g}": _ints("blockround", b, g, **B4) for b, g in ((4, 128), (4, 64), (3, 64))},
    "blockround-b4-32it-gptaq-w4g128": _ints("blockround", 4, 128, **B4, **FP),
    "blockround-b4-32it-scales-w4g128": _ints("blockround", 4, 128, **B4, scales=True),
    "blockround-b4-32it-seed1-w4g128": _ints("blockround", 4, 128, **B4, seed=1),
    "blockround-64it-scales-w4g64": _ints("blockround", 4, 64, iterations=64, scales=True),
    "gptq-w4g64": _ints("gptq", 4, 64),
    "blockround-w4g64": _ints("blockround", 4, 64),
    "gptq-w3g64": _ints("gptq", 3, 64),
    "blockround-w3g64": _ints("blockround", 3, 64),
    "blockround-64it-scales-w3g64": _ints("blockround", 3, 64, iterations=64, scales=True),
    **{
        f"blockround-rtn-200it-scales-w{b}g{g}": _ints("blockround", b, g, **RTN_RECIPE)
        for b, g in ((3, 64), (4, 64), (4, 128))
    },
    "gptq-q4_0": _gguf("gptq", "Q4_0"),
    "blockround-q4_0": _gguf("blockround", "Q4_0"),
    "gptq-q4_k_m": _gguf("gptq", "Q4_K_M"),
    "blockround-q4_k_m": _gguf("blockround", "Q4_K_M"),
    "blockround-q3_k_m": _gguf("blockround", "Q3_K_M", bits=3),
    **{f"blockround-b4-32it-{kind.lower()}": _gguf("blockround", kind, **B4) for kind in ("Q4_0", "Q4_K_M")},
    **{f"blockround-16x8-{kind.lower()}": _gguf("blockround", kind, **FORMER) for kind in ("Q4_0", "Q4_K_M")},
    **{f"blockround-16x8-w{b}g{g}": _ints("blockround", b, g, **FORMER) for b, g in ((4, 128), (4, 64), (3, 64))},
    "blockround-b4-32it-seed1-w4g64": _ints("blockround", 4, 64, **B4, seed=1),
}
STEM = result_stem("smollm2", "blockwise")


def machine() -> dict[str, Any]:
    info = dict(
        line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    )
    return {
        "cpu": info.get("Model name", "").strip(),
        "flags": [flag for flag in info.get("Flags", "").split() if flag.startswith(("avx512", "amx"))],
        "cores": info.get("CPU(s)", "").strip(),
        "platform": platform.platform(),
        "note": "2 cores shared with other jobs; full-model runs under a shared CPU lock, torch threads 2",
    }


def load() -> dict[str, Any]:
    path = STEM.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {"settings": SETTINGS, "rows": [], "timing": None}


def save(result: dict[str, Any]) -> None:
    result["machine"] = machine()
    STEM.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    STEM.with_suffix(".md").write_text(markdown(result))


def parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            total += sum(_numel(tensors, key) for key in tensors.keys())
    return total


def _numel(tensors: Any, key: str) -> int:
    count = 1
    for size in tensors.get_slice(key).get_shape():
        count *= size
    return count


def f32_gguf(work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from benchmarks.lib.heldout import heldout_ids, score_gguf
    from tests.support.gguf_harness import convert

    folder = smollm2_folder()
    convert(folder, work / "F32.gguf", "f32")
    score = score_gguf(work / "F32.gguf", heldout_ids(AutoTokenizer.from_pretrained(folder)))
    return {"row": "f32-gguf", "runtime": "llama.cpp", "method": "none", "grid": "F32", **score}


def quantize_row(label: str, work: Path, result: dict[str, Any]) -> dict[str, Any]:
    import quantcli
    from quantcli.config.quantize import QuantizeConfig

    method, grid, options, gguf_type = ROWS[label]
    options = dict(options)
    bits = options.pop("bits")
    folder = smollm2_folder()
    config = QuantizeConfig(
        bits=bits,
        model=str(folder),
        method=method,
        output=work / label,
        method_options=options,
        calibration=calibration_config(),
        eval=None,
        device="cpu",
        **({"format": "gguf", "gguf_type": gguf_type} if gguf_type else {}),
    )
    start = time.perf_counter()
    report = quantcli.quantize(config)
    seconds = time.perf_counter() - start
    row = {"row": label, "method": method, "grid": grid, "quantize_s": round(seconds, 1), "settings": report.options}
    if "block_output_error" in report.stats:
        row["block_output_error"] = report.stats["block_output_error"]
    if gguf_type:
        from transformers import AutoTokenizer

        from benchmarks.lib.heldout import base_logits, heldout_ids, score_gguf
        from quantcli.formats.gguf.writer import gguf_file
        from tests.support.gguf_harness import gguf_sizes

        file = gguf_file(work / label)
        sizes = gguf_sizes(file)
        score = score_gguf(file, heldout_ids(AutoTokenizer.from_pretrained(folder)), base_logits())
        base = next((r["perplexity"] for r in result["rows"] if r["row"] == "f32-gguf"), F32_GGUF_PERPLEXITY)
        row.update(runtime="llama.cpp", file_bytes=sizes["file_bytes"], bits_per_weight=sizes["bits_per_weight"])
    else:
        score = score_checkpoint(work / label)
        files = sum(f.stat().st_size for f in (work / label).glob("*.safetensors"))
        weights = parameters(folder)
        base = FP32_PERPLEXITY
        row.update(runtime="quantcli", file_bytes=files, bits_per_weight=8 * files / weights)
    row.update(score)
    row["increase_pct"] = None if base is None else 100 * (score["perplexity"] / base - 1)
    return row


TIMING_RUNS = {
    "gptq": ("gptq", {}),
    "gptaq": ("gptq", {"target": "full-precision"}),
    "blockround": ("blockround", {}),
    "blockround-gptaq": ("blockround", {"target": "full-precision"}),
    "blockround-16x8": ("blockround", FORMER),
}


def timing(blocks: int, grid: str, runs: list[str], threads: int) -> dict[str, Any]:
    """Quantize seconds of ``runs`` (TIMING_RUNS) on SmolLM2's first ``blocks`` blocks (0: all) on ``grid``
    (W4 g128, or a GGUF type rounded on its block grid), one process, in order: the ratio is what a run costs
    against gptq's. Every block is forwarded either way, so a few blocks understate the ratio."""
    import torch

    from quantcli.formats.gguf.types import block_type
    from quantcli.methods import get_method
    from quantcli.quant.layers import select_modules
    from quantcli.quant.records import QuantizeRequest
    from quantcli.sources.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    source = str(smollm2_folder())
    tokenizer = load_tokenizer(source)
    windows = calibration_windows(tokenizer)
    kind = None if grid == "W4 g128" else block_type(grid)
    seconds = {}
    for label in runs:
        method, options = TIMING_RUNS[label]
        model = load_model(source, torch.float32, "cpu")
        names = tuple(
            name
            for name in select_modules(model, tables=False).names
            if not blocks or any(name.startswith(f"model.layers.{index}.") for index in range(blocks))
        )
        config = get_method(method).make_config(4, options if kind else {"group_size": 128, **options})
        start = time.perf_counter()
        get_method(method).quantize(
            QuantizeRequest(source, model, tokenizer, names, "cpu", torch.float32, config, windows, grid=kind)
        )
        seconds[label] = round(time.perf_counter() - start, 1)
    return {
        "grid": grid,
        "blocks": blocks or "all",
        "threads": threads,
        "seconds": seconds,
        "ratio_to_gptq": {k: round(v / seconds["gptq"], 2) for k, v in seconds.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| row | runtime | grid | bits/weight | file bytes | perplexity | increase % | KL | top-1 | quantize s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:

        def fmt(key: str, spec: str, r: dict = r) -> str:
            return format(r[key], spec) if r.get(key) is not None else "-"

        lines.append(
            f"| {r['row']} | {r['runtime']} | {r['grid']} | {fmt('bits_per_weight', '.3f')} |"
            f" {fmt('file_bytes', ',')} |"
            f" {fmt('perplexity', '.3f')} | {fmt('increase_pct', '+.2f')} | {fmt('kl_divergence', '.4f')} |"
            f" {fmt('top1_agreement', '.4f')} | {fmt('quantize_s', '.0f')} |"
        )
    lines.append("")
    lines.append(
        "SmolLM2-135M-Instruct (weights dequantized from its Q4_1 GGUF); held-out protocol"
        " (benchmarks/lib/heldout.py):"
        f" calibration {json.dumps(SETTINGS['calibration'])}, eval {json.dumps(SETTINGS['eval'])}. Compressed-tensors"
        f" rows keep the embedding 16-bit; increase vs fp32 {FP32_PERPLEXITY} (transformers); GGUF rows scored by"
        " llama.cpp, increase vs its F32 GGUF. Each row's settings are in blockwise.json; rows without a batch"
        " setting ran at 8 windows per step, the only choice then (blockround's defaults were 16 steps of 8 windows"
        " until 2026-12-07; since, 32 steps of 4: the b4-32it rows)."
    )
    for t in result.get("timings", []):
        lines.append("")
        lines.append(
            f"Quantize time, {t['grid']}, {t['blocks']} blocks, one process, torch threads {t.get('threads', 2)}: "
            + ", ".join(f"{k}: {v} s ({t['ratio_to_gptq'][k]}x gptq)" for k, v in t["seconds"].items())
            + "."
        )
    lines += [""] + [f"- {note}" for note in result.get("notes", [])]
    lines += [f"- {r['row']}: {r['notes']}" for r in result["rows"] if r.get("notes")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[], choices=[*ROWS, "f32-gguf"])
    parser.add_argument("--timing", type=int, help="time the methods on this many first blocks (0: all)")
    parser.add_argument("--timing-grid", default="W4 g128", help="W4 g128 or a GGUF type, e.g. Q4_K_M")
    parser.add_argument("--timing-runs", nargs="+", choices=list(TIMING_RUNS), default=list(TIMING_RUNS))
    parser.add_argument("--timing-threads", type=int, default=2, help="torch threads for the timing")
    args = parser.parse_args()
    result = load()
    if args.timing is not None:
        measured = timing(args.timing, args.timing_grid, args.timing_runs, args.timing_threads)
        result = load()
        key = (measured["grid"], measured["blocks"], measured["threads"])
        kept = [t for t in result.get("timings", []) if (t["grid"], t["blocks"], t.get("threads", 2)) != key]
        result["timings"] = [*kept, measured]
        save(result)
    for label in args.rows:
        with tempfile.TemporaryDirectory(prefix="blockwise-") as tmp:
            row = f32_gguf(Path(tmp)) if label == "f32-gguf" else quantize_row(label, Path(tmp), result)
        result = load()  # another call may have added rows meanwhile
        result["rows"] = [r for r in result["rows"] if r["row"] != label] + [row]
        save(result)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
