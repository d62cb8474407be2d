"""llama.cpp's own numbers, the bar for quantcli's real-model tables: an HF folder converted to an F32
GGUF by llama.cpp's convert_hf_to_gguf.py, quantized by llama.cpp's own quantizer
(``llama_model_quantize``, default settings, no imatrix), then size on disk and perplexity measured
by llama.cpp itself on exactly quantcli's eval token ids and windows. The fp32 HF model is scored on
the same windows with plain transformers; the F32 GGUF must match it (a check of the harness).

    make llama-cpp
    python -m benchmarks.llamacpp [--models stories260K smollm2] [--threads 2]

Token ids: the HF tokenizer's ``tokenizer(text)["input_ids"][:max_tokens]`` of the whole eval text
tokenized at once (quantcli's "stream" protocol): for stories260K the text of ``tinystories:eval``
(its paragraphs joined by a blank line; the tokenizer puts BOS first), for SmolLM2 the bytes of
benchmarks/data/wikitext-2/wiki.valid.eval.txt (no BOS: its tokenizer adds none). Windows: seq_len,
non-overlapping, each scored on all positions but its first. Writes benchmarks/results/<model>/llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.lib.llamacpp_tables import NOTES, run_each
from tests.support.gguf_harness import (
    HARNESS_TOLERANCE_PCT,
    MODELS,
    REPO,
    convert,
    eval_ids,
    gguf_sizes,
    hf_logits,
    llamacpp_logits,
    model_folder,
    perplexity,
    quantize,
    window_nlls,
)

TYPES = ("Q8_0", "Q5_0", "Q4_1", "Q4_0", "Q4_K_M")


def row(
    kind: str, sizes: dict[str, Any], ppl: float, ref: dict[str, float], seconds: float | None, eval_s: float
) -> dict[str, Any]:
    return {
        "type": kind,
        **sizes,
        "file_mb": sizes["file_bytes"] / 1e6,
        "perplexity": ppl,
        "delta_pct_vs_f32_gguf": 100 * (ppl / ref["f32_gguf"] - 1) if "f32_gguf" in ref else 0.0,
        "delta_pct_vs_hf_fp32": 100 * (ppl / ref["hf"] - 1),
        "quantize_seconds": seconds,
        "eval_seconds": eval_s,
    }


def run(name: str, threads: int, workdir: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every row of one model's table; ``save`` gets the result so far after each row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, folder = MODELS[name], model_folder(name)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{name}: no HF folder at {folder}. Set QUANTCLI_SMOLLM2 or run `make smollm2`.")
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = eval_ids(tokenizer, spec["dataset"], spec["max_tokens"])
    seq_len = spec["seq_len"]
    log = lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True)  # noqa: E731

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    ref = {"hf": perplexity(window_nlls(hf_logits(model), ids, seq_len))}
    hf_sizes = {
        "file_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "tensor_bytes": 4 * params,
        "parameters": params,
        "bits_per_weight": 32.0,
        "tensor_types": {"F32": params},
    }
    hf_sizes["file_bits_per_weight"] = 8 * hf_sizes["file_bytes"] / params
    rows = [row("HF fp32 (transformers)", hf_sizes, ref["hf"], ref, None, time.perf_counter() - start)]
    log(f"HF fp32 perplexity {ref['hf']:.4f}")
    del model
    result = {
        "model": name,
        "folder": str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder.name),
        "complete": False,
        "settings": {
            "dataset": spec["dataset"],
            "tokens": len(ids),
            "seq_len": seq_len,
            "stride": seq_len,
            "token_ids": "HF tokenizer(text)['input_ids'][:tokens], text tokenized at once (quantcli stream protocol)",
            "first_ids": ids[:8],
            "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "bos_first": ids[0] == tokenizer.bos_token_id,
            "threads": threads,
            "kv_cache": "F16 (llama.cpp's default)",
            "quantizer": "llama_model_quantize, default params, no imatrix",
            "converter": "convert_hf_to_gguf.py --outtype f32"
            + (" (tokenizer.model: benchmarks/data/stories260K)" if spec.get("tokenizer_model") else ""),
        },
        "harness_check": None,
        "note": NOTES[name],
        "rows": rows,
    }
    save(result)

    f32 = workdir / f"{name}-F32.gguf"
    convert_seconds = convert(folder, f32, "f32", spec.get("tokenizer_model"))
    for kind in ("F32", *TYPES):
        path = f32 if kind == "F32" else workdir / f"{name}-{kind}.gguf"
        seconds = convert_seconds if kind == "F32" else quantize(f32, path, kind, threads)
        start = time.perf_counter()
        ppl = perplexity(window_nlls(llamacpp_logits(path, seq_len, threads), ids, seq_len))
        if kind == "F32":
            ref["f32_gguf"] = ppl
            diff = abs(100 * (ppl / ref["hf"] - 1))
            result["harness_check"] = {
                "f32_gguf_vs_hf_pct": diff,
                "tolerance_pct": HARNESS_TOLERANCE_PCT,
                "ok": diff <= HARNESS_TOLERANCE_PCT,
            }
        rows.append(row(f"llama.cpp {kind}", gguf_sizes(path), ppl, ref, seconds, time.perf_counter() - start))
        log(f"{kind}: {rows[-1]['file_bytes']} bytes, perplexity {ppl:.4f}")
        save(result)
    result["complete"] = True
    save(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    s, check = result["settings"], result["harness_check"]
    lines = [
        f"# llama.cpp on {result['model']}",
        "",
        f"{s['dataset']}, first {s['tokens']} tokens ({s['token_ids']}; BOS first: {s['bos_first']}), windows of"
        f" {s['seq_len']} without overlap, each scored on all positions but its first. Quantizer: {s['quantizer']};"
        f" perplexity by llama.cpp (KV cache {s['kv_cache']}, threads: {s['threads']}). {result['note']}",
        "",
        "Harness check: not measured (the run stopped before the F32 GGUF was scored)."
        if check is None
        else f"Harness check: llama.cpp's F32 GGUF vs transformers fp32 differ by {check['f32_gguf_vs_hf_pct']:.4f}%"
        f" (tolerance {check['tolerance_pct']}%): {'ok' if check['ok'] else 'FAILED'}.",
        "" if result["complete"] else "**Incomplete run: the rows below are all that finished.**\n",
        "| type | size on disk | bits/weight (all params) | perplexity | vs F32 GGUF | vs HF fp32 | quantize s |"
        " tensor types (share of params) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        types = ", ".join(f"{k} {100 * v / r['parameters']:.0f}%" for k, v in r["tensor_types"].items())
        seconds = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.2f}"
        lines.append(
            f"| {r['type']} | {r['file_bytes']:,} B ({r['file_mb']:.2f} MB) | {r['bits_per_weight']:.2f} |"
            f" {r['perplexity']:.4f}"
            f" | {r['delta_pct_vs_f32_gguf']:+.3f}% | {r['delta_pct_vs_hf_fp32']:+.3f}% | {seconds} | {types} |"
        )
    lines += [
        "",
        "F32's quantize time is convert_hf_to_gguf.py's (a subprocess, with its imports). Times are wall-clock on a"
        " shared,"
        " overloaded 2-core machine. Q4_K_M falls back to Q5_0 (and Q8_0/Q6_K) on tensors whose rows are not a"
        " multiple of 256.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), help="default: every model whose folder is present"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="llama.cpp and torch threads (1 avoids spin-waits on a busy machine)"
    )
    args = parser.parse_args()
    names = []
    for name in args.models or list(MODELS):
        if args.models is None and not (model_folder(name) / "config.json").is_file():
            print(
                f"[{name}] skipped: no HF folder at {model_folder(name)} (set QUANTCLI_SMOLLM2 or run `make smollm2`)",
                file=sys.stderr,
            )
            continue
        names.append(name)
    run_each(names, "llamacpp", args.threads, run, markdown)


if __name__ == "__main__":
    main()
