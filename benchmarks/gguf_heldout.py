"""Issue 26 item 3 on the held-out protocol: GPTQ's GGUF files with and without the Hessian-steered scale
search (``importance``: llama.cpp's imatrix quantizer with each layer's ``diag(H)`` as the imatrix), at Q4_0,
Q4_K_M and Q3_K_M, and quantcli's RTN Q3_K_M (llama.cpp's own quantizer, checked tensor for tensor against
``llama_model_quantize``'s file).

Every row on :mod:`benchmarks.lib.heldout`'s protocol: SmolLM2-135M-Instruct (weights dequantized Q4_1),
calibration 64 x 256 tokens of WikiText-2's calibration half, scored by llama.cpp on the first 16,384
tokens of the tiny-shakespeare held-out text in windows of 512 (:func:`~benchmarks.lib.heldout.score_gguf`),
the increase against llama.cpp's perplexity of the F32 GGUF (row ``f32``, run first), KL and top-1
agreement against the fp32 model. One row per call, so each fits one job under the CPU lock:

    flock /tmp/quantcli-cpu.lock nice -n 10 python -m benchmarks.gguf_heldout --row f32
    flock /tmp/quantcli-cpu.lock nice -n 10 python -m benchmarks.gguf_heldout --row gptq-Q3_K_M-importance

Rows are kept in benchmarks/results/smollm2/gguf-heldout.{json,md} (a row run again replaces its old one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.lib import heldout
from benchmarks.lib.results import result_stem
from benchmarks.lib.setups import SMOLLM2_CAVEAT

ROWS = (
    "f32",
    "rtn-Q3_K_M",
    "gptq-Q3_K_M",
    "gptq-Q3_K_M-importance",
    "gptq-Q4_0",
    "gptq-Q4_0-importance",
    "gptq-Q4_K_M",
    "gptq-Q4_K_M-importance",
)
GPTQ = "quantcli's defaults (act-order, static blocks, damp 0.01, clip search)"


def machine() -> dict[str, Any]:
    """The CPU model and flags (``lscpu``) and the thread count the jobs ran with."""
    found = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in found if ":" in line)
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": os.cpu_count(),
        "flags_avx512": sorted(f for f in fields.get("Flags", "").split() if f.startswith("avx512")),
        "note": "shared 2-core machine, other jobs kept off by the CPU lock",
    }


def quantize(row: str, workdir: Path) -> tuple[Path, float]:
    """quantcli's GGUF file of a row and its quantize time in seconds."""
    import quantcli
    from quantcli.config.quantize import QuantizeConfig
    from quantcli.formats.gguf.types import block_type
    from quantcli.formats.gguf.writer import gguf_file
    from tests.support.models import smollm2_folder

    method, kind = row.split("-")[:2]
    options = {"importance": row.endswith("importance")} if method == "gptq" else {}
    out = workdir / row
    config = QuantizeConfig(
        bits=block_type(kind).bits,
        model=str(smollm2_folder()),
        method=method,
        output=out,
        eval=None,
        format="gguf",
        gguf_type=kind,
        method_options=options,
        force=True,
        **({"calibration": heldout.calibration_config()} if method == "gptq" else {}),
    )
    start = time.perf_counter()
    quantcli.quantize(config)
    return gguf_file(out), time.perf_counter() - start


def measure(row: str, workdir: Path, results: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tests.support.gguf_harness import convert, gguf_sizes, same_tensors
    from tests.support.gguf_harness import quantize as llamacpp_quantize
    from tests.support.models import smollm2_folder

    ids = heldout.heldout_ids(AutoTokenizer.from_pretrained(smollm2_folder()))
    f32 = workdir / "F32.gguf"
    if not f32.exists():
        convert(smollm2_folder(), f32, "f32")
    if row == "f32":
        path, seconds, extra = f32, None, {}
    else:
        if "f32" not in results:
            raise SystemExit("run --row f32 first: every increase is against the F32 GGUF's perplexity")
        path, seconds = quantize(row, workdir)
        extra = {}
        if row.startswith("rtn"):
            theirs = workdir / "llamacpp-Q3_K_M.gguf"
            llamacpp_quantize(f32, theirs, "Q3_K_M")
            identical, typed, total = same_tensors(path, theirs)
            extra["same_as_llama_model_quantize"] = f"{identical} of {total} tensors byte-identical ({typed} same type)"
    scores = heldout.score_gguf(path, ids, heldout.base_logits())
    sizes = gguf_sizes(path)
    method, grid = ("llama.cpp", "F32") if row == "f32" else row.split("-")[:2]
    base = scores["perplexity"] if row == "f32" else results["f32"]["perplexity"]
    return {
        "row": row,
        "runtime": "quantcli" if row != "f32" else "llama.cpp",
        "method": method,
        "grid": grid,
        "importance": row.endswith("importance"),
        "file_bytes": sizes["file_bytes"],
        "bits_per_weight": sizes["bits_per_weight"],
        "tensor_types": sizes["tensor_types"],
        **scores,
        "increase_pct": 100 * (scores["perplexity"] / base - 1),
        "quantize_s": seconds,
        "settings": {"gptq": GPTQ} if method == "gptq" else {},
        **extra,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# GGUF on the held-out protocol: GPTQ with and without the Hessian-steered scale search",
        "",
        f"{SMOLLM2_CAVEAT} Scored by llama.cpp (tiny-shakespeare held-out, 16,384 tokens, windows of 512);",
        "increase against llama.cpp's perplexity of the F32 GGUF; KL and top-1 against the fp32 model.",
        "",
        "| row | grid | importance | file bytes | bits/weight | perplexity | increase | KL | top-1 | quantize s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in ROWS:
        if name in results:
            r = results[name]
            seconds = "" if r["quantize_s"] is None else f"{r['quantize_s']:.0f}"
            lines.append(
                f"| {name} | {r['grid']} | {'yes' if r['importance'] else ''} | {r['file_bytes']:,} |"
                f" {r['bits_per_weight']:.3f} | {r['perplexity']:.4f} | {r['increase_pct']:+.2f}% |"
                f" {r['kl_divergence']:.4f} | {r['top1_agreement']:.4f} | {seconds} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", choices=ROWS, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/quantcli-gguf-heldout"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stem = result_stem("smollm2", "gguf-heldout")
    stored = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    results = {r["row"]: r for r in stored.get("rows", [])}
    results[args.row] = measure(args.row, args.workdir, results)
    document = {
        "settings": {**heldout.SETTINGS, "scored_by": "llama.cpp (llama-cpp-python 0.3.36), F32 GGUF as the base"},
        "machine": machine(),
        "rows": [results[name] for name in ROWS if name in results],
    }
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
