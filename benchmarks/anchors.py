"""Issue 26's anchors: quantcli's GPTQ beside the strongest quantizers users pick, at equal bytes, on ONE
protocol (benchmarks/lib/heldout.py): llama.cpp's ``llama-quantize`` with and without an importance matrix
(``llama-imatrix`` on quantcli's exact calibration windows) at Q4_0, Q4_K_M, Q3_K_M and IQ4_XS; AutoRound
(RTN mode, light, default 200 iterations) at W4 g128, W4 g64 and W3 g64 exported as compressed-tensors; quantcli's
gptq at the same GGUF types and integer grids (embedding kept 16-bit on the integer grids).

    make llama-tools autoround
    python -m benchmarks.anchors --rows ROW [ROW ...]   (--list: every row; default: all)

GGUF files are scored by llama.cpp on quantcli's token ids (``score_gguf``), their increase against the F32
GGUF's llama.cpp perplexity; transformers-loadable checkpoints by ``quantcli.evaluate`` (``score_checkpoint``),
against SmolLM2 fp32. Each row is written to benchmarks/results/smollm2/anchors.{json,md} as it finishes
(rows of earlier runs are kept). Run each full-model row under the shared CPU lock:
``flock /tmp/quantcli-cpu.lock nice -n 10 python -m benchmarks.anchors --rows ROW``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lib.results import labelled, result_stem

OUT = Path(__file__).resolve().parents[1] / "out"  # out/anchors[-LABEL]: the F32 GGUF and imatrix, kept between rows
GGUF_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "IQ4_XS")
QUANTCLI_GGUF = ("Q4_0", "Q4_K_M")  # quantcli writes no Q3_K_M or IQ4_XS yet
INT_GRIDS = ((4, 128), (4, 64), (3, 64))


@dataclass(frozen=True)
class Row:
    """One row: who quantizes, how, on which grid; ``make(work)`` returns (path, quantize seconds, settings)."""

    runtime: str
    method: str
    grid: str
    make: Callable[[Path], tuple[Path, float, dict[str, Any]]] | None = field(default=None, compare=False)


def rows() -> dict[str, Row]:
    from benchmarks.lib import anchor_runs as runs

    table = {
        "fp32": Row("transformers", "fp32", "fp32"),
        "llamacpp-f32": Row("llama.cpp", "convert_hf_to_gguf.py", "F32", runs.f32_gguf_row),
    }
    for kind in GGUF_TYPES:
        for imatrix in (False, True):
            name = f"llamacpp-{kind.lower()}{'-imatrix' if imatrix else ''}"
            make = lambda work, kind=kind, imatrix=imatrix: runs.llamacpp_file(work, kind, imatrix)  # noqa: E731
            table[name] = Row("llama.cpp", "llama-quantize" + (" + imatrix" if imatrix else ""), kind, make)
    for kind in QUANTCLI_GGUF:
        make = lambda work, kind=kind: runs.quantcli_model(work, kind, 4, format="gguf", gguf_type=kind)  # noqa: E731
        table[f"quantcli-gptq-{kind.lower()}"] = Row("quantcli", "gptq", kind, make)
    for bits, group in INT_GRIDS:
        grid = f"W{bits} g{group}"
        for recipe in runs.AUTOROUND_RECIPES:
            make = lambda work, r=recipe, b=bits, g=group: runs.autoround_model(work, r, b, g)  # noqa: E731
            table[f"autoround-{recipe}-w{bits}g{group}"] = Row("auto-round", f"autoround {recipe}", grid, make)
        make = lambda work, b=bits, g=group: runs.quantcli_model(  # noqa: E731
            work, f"w{b}g{g}", b, method_options={"group_size": g}
        )
        table[f"quantcli-gptq-w{bits}g{group}"] = Row("quantcli", "gptq", grid, make)
    return table


def machine() -> dict[str, str]:
    info = dict(
        line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    )
    keep = ("Model name", "CPU(s)", "Flags")
    return {key: info[key].strip() for key in keep if key in info}


def sizes(path: Path) -> dict[str, Any]:
    """Bytes on disk, bits per weight over every parameter of the model (134.5 M for SmolLM2), and the bytes of
    the decoder blocks' linear layers alone (their codes, scales and zero points: what the grids differ in)."""
    from tests.support.gguf_harness import gguf_sizes

    if path.is_file():
        from gguf import GGUFReader

        found = gguf_sizes(path)
        linear = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if LINEAR_GGUF.search(t.name))
        return {
            "file_bytes": found["file_bytes"],
            "bits_per_weight": found["bits_per_weight"],
            "linear_bytes": linear,
            "tensor_types": found["tensor_types"],
        }
    from math import prod

    from safetensors import safe_open

    file_bytes, linear = 0, 0
    for file in path.rglob("*.safetensors"):
        file_bytes += file.stat().st_size
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                if "_proj." in key:
                    linear += prod(tensor.get_shape()) * DTYPE_BYTES[tensor.get_dtype()]
    return {"file_bytes": file_bytes, "bits_per_weight": 8 * file_bytes / parameters(), "linear_bytes": linear}


LINEAR_GGUF = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1}


def parameters() -> int:
    """SmolLM2's parameter count, from its safetensors headers (the tied head counted once)."""
    from math import prod

    from safetensors import safe_open

    from tests.support.models import smollm2_folder

    total = 0
    for file in smollm2_folder().glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            total += sum(prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def score(path: Path) -> dict[str, float]:
    """llama.cpp on quantcli's ids for a GGUF file (KL to the fp32 transformers model), else quantcli.evaluate."""
    from benchmarks.lib.heldout import heldout_ids, score_checkpoint, score_gguf

    if path.is_file():
        from transformers import AutoTokenizer

        from tests.support.models import smollm2_folder

        return score_gguf(path, heldout_ids(AutoTokenizer.from_pretrained(smollm2_folder())), base_scorer())
    return score_checkpoint(path)


_BASE: dict[str, Any] = {}


def base_scorer() -> Callable[[list[int]], Any]:
    """The fp32 model's logits per window, computed once per process for every GGUF row (32 windows, 3.2 GB)."""
    if "scorer" not in _BASE:
        from benchmarks.lib.heldout import base_logits

        scorer, memo = base_logits(), {}

        def logits(ids: list[int]) -> Any:
            key = tuple(ids)
            if key not in memo:
                memo[key] = scorer(ids)
            return memo[key]

        _BASE["scorer"] = logits
    return _BASE["scorer"]


def measure(name: str, spec: Row, result: dict[str, Any], work: Path) -> dict[str, Any]:
    from benchmarks.lib.heldout import score_checkpoint
    from tests.support.models import smollm2_folder

    work.mkdir(parents=True, exist_ok=True)
    if spec.make is None:  # the fp32 base itself
        path, seconds, settings = smollm2_folder(), None, {}
        scores = score_checkpoint(path)
    else:
        path, seconds, settings = spec.make(work)
        scores = score(path)
    sized = Path(settings.pop("packed_path", path))
    base = (
        scores["perplexity"] if name == "fp32" else base_perplexity(result, path.is_file() and name != "llamacpp-f32")
    )
    return {
        "row": name,
        "runtime": spec.runtime,
        "method": spec.method,
        "grid": spec.grid,
        **sizes(sized),
        **scores,
        "increase_pct": None if base is None else 100 * (scores["perplexity"] / base - 1),
        "quantize_s": seconds,
        "settings": settings,
    }


def base_perplexity(result: dict[str, Any], gguf: bool) -> float | None:
    """The F32 GGUF's llama.cpp perplexity for GGUF rows, SmolLM2 fp32's for the others (rows measured first)."""
    found = {row["row"]: row["perplexity"] for row in result["rows"]}
    return found.get("llamacpp-f32" if gguf else "fp32")


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Anchors on SmolLM2-135M (issue 26): quantcli beside llama.cpp + imatrix and AutoRound",
        "",
        f"{s['model']}. Calibration: {s['calibration']['samples']} windows of {s['calibration']['seq_len']} tokens of"
        f" {s['calibration']['dataset']} (the same ids for every quantizer). Eval: first {s['eval']['tokens']} tokens"
        f" of {s['eval']['dataset']}, windows of {s['eval']['seq_len']}. GGUF rows are scored by llama.cpp on"
        " quantcli's token ids, Δ against the F32 GGUF's llama.cpp perplexity; the others by quantcli.evaluate, Δ"
        " against SmolLM2 fp32. KL is to SmolLM2 fp32 (transformers) for every row. Machine: "
        f"{result['machine'].get('Model name', '?')}, {result['machine'].get('CPU(s)', '?')} CPUs, shared.",
        "",
        "| row | runtime | method | grid | bytes | linear-layer bytes | bits/weight | perplexity | Δ ppl | KL | top-1 |"
        " quantize s |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        delta = "" if r.get("increase_pct") is None else f"{r['increase_pct']:+.2f}%"
        kl = "" if r.get("kl_divergence") is None else f"{r['kl_divergence']:.4f}"
        top1 = "" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.3f}"
        secs = "" if r.get("quantize_s") is None else f"{r['quantize_s']:.0f}"
        lines.append(
            f"| {r['row']} | {r['runtime']} | {r['method']} | {r['grid']} | {r['file_bytes']:,} |"
            f" {r['linear_bytes']:,} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {delta} | {kl} | {top1} |"
            f" {secs} |"
        )
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "- imatrix rows' quantize time includes llama-imatrix's (the same matrix serves every type).",
    "- Linear-layer bytes: the decoder blocks' q/k/v/o/gate/up/down tensors with their scales and zero points, the"
    " part every grid quantizes; AutoRound's packed export keeps the embedding in fp32, quantcli's in 16 bits.",
    "- AutoRound rows are scored on its quantized weights put into the fp32 model (its packed W4 g128 export, in its"
    " own auto_round format, does not load in transformers 5.25 on CPU, and compressed-tensors refuses g128 on"
    " 576 columns); their bytes are its packed export's.",
    "- Integer-grid rows keep the embedding 16-bit (quantcli's default; AutoRound quantizes only the decoder"
    " blocks), so their bytes are dominated by it; GGUF rows quantize the embedding too.",
    "- At g128 quantcli groups each 576-wide row in 9 groups of 64 (plan_layouts: the largest divisor at or"
    " below the asked size) and the 1536-wide down_proj in 12 groups of 128; AutoRound pads 576 with zeros"
    " to 5 groups of 128. So quantcli's 'W4 g128' carries more scales: compare the bytes column.",
]


def load(stem: Path) -> dict[str, Any]:
    from benchmarks.lib.heldout import SETTINGS

    path = stem.with_suffix(".json")
    if path.is_file():
        return json.loads(path.read_text())
    return {"settings": SETTINGS, "machine": machine(), "rows": []}


def save(stem: Path, result: dict[str, Any], order: list[str]) -> None:
    result["rows"].sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))


def main() -> None:
    table = rows()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(table), default=list(table), metavar="ROW")
    parser.add_argument("--list", action="store_true", help="print every row and exit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", help="write anchors-LABEL, work in out/anchors-LABEL (e.g. with QUANTCLI_SMOLLM2)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{name}: {spec.runtime}, {spec.method}, {spec.grid}" for name, spec in table.items()))
        return
    import torch

    torch.set_num_threads(args.threads)
    stem = result_stem("smollm2", labelled("anchors", args.label))
    work = OUT / labelled("anchors", args.label)
    for name in args.rows:
        result = load(stem)
        for base in ("fp32", "llamacpp-f32"):  # every Δ needs its base first
            needed = base == "fp32" or name.startswith(("llamacpp", "quantcli-gptq-q"))
            if needed and base != name and base_perplexity(result, base != "fp32") is None:
                result["rows"].append(measure(base, table[base], result, work))
                save(stem, result, list(table))
        try:
            row = measure(name, table[name], result, work)
        except Exception:  # one failed row must not lose the others of a long run
            traceback.print_exc()
            continue
        result = load(stem)
        result["rows"] = [r for r in result["rows"] if r["row"] != name] + [row]
        save(stem, result, list(table))
        print(f"{name}: {row['file_bytes']:,} B, ppl {row['perplexity']:.3f} ({row['increase_pct']}%)", file=sys.stderr)


if __name__ == "__main__":
    main()
