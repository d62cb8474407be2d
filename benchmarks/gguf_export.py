"""quantcli's GGUF files against llama.cpp's own quantizer, all scored by llama.cpp on the same token ids.

For each type (default Q4_0, Q4_K_M, Q5_0, Q4_1, Q8_0; ``--types`` picks others: Q4_K, Q6_K, Q4_K_S):
llama.cpp's ``llama_model_quantize`` on an F32 GGUF of the model (llama.cpp's convert_hf_to_gguf.py) where
llama.cpp has that file type, ``quantcli quantize --format gguf --method gptq`` and ``--method rtn`` where
quantcli has it (``--rtn-only``: no GPTQ rows). Perplexity through llama.cpp (tests/support/gguf_harness.py)
on exactly the ids and windows of benchmarks/llamacpp.py: stories260K on tinystories:eval (32,768 tokens,
windows of 256), SmolLM2-135M on wiki.valid.eval.txt (16,384 tokens, windows of 512). GPTQ calibrates as
benchmarks/lib/setups.py does: tinystories:calib, or wiki.valid.calib.txt, 128 windows of 256 tokens, seed 0.
Each quantcli RTN file's tensors are compared with llama.cpp's file of the same type (quantcli's Q4_K, which
llama.cpp has no file type for, with its Q4_K_S file, run before it: the tensors of the same type); where
every tensor is byte-identical the two files score the same and llama.cpp's number is reused (said in the
row). Also: ``quantcli eval`` of llama.cpp's own Q4_0 file against llama.cpp.

    QUANTCLI_LLAMACPP=/path/.llamacpp python -m benchmarks.gguf_export [--models stories260K smollm2]
        [--types Q4_K_M Q4_K] [--rtn-only] [--no-clip-search] [--label kquants]

Writes benchmarks/results/<model>/gguf-export[-LABEL].{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.llamacpp_tables import NOTES, quantcli_eval, run_each
from benchmarks.lib.results import labelled
from tests.support.gguf_harness import (
    FTYPES,
    MODELS,
    REPO,
    convert,
    eval_ids,
    eval_text,
    gguf_sizes,
    llamacpp_logits,
    model_folder,
    perplexity,
    quantize,
    same_tensors,
    window_nlls,
)

TYPES = ("Q4_0", "Q4_K_M", "Q5_0", "Q4_1", "Q8_0")
GPTQ_SETTINGS = "quantcli's defaults (act-order, static blocks, damp 0.01, clip search)"
CALIBRATION = {
    "stories260K": "tinystories:calib",
    "smollm2": str(REPO / "benchmarks" / "data" / "wikitext-2" / "wiki.valid.calib.txt"),
}


def quantcli_file(
    name: str, folder: Path, method: str, kind: str, workdir: Path, options: dict[str, Any]
) -> tuple[Path, float]:
    import quantcli
    from quantcli.config.quantize import CalibrationConfig, QuantizeConfig
    from quantcli.formats.gguf.types import block_type
    from quantcli.formats.gguf.writer import gguf_file

    out = workdir / f"{method}-{kind}"
    config = QuantizeConfig(
        bits=block_type(kind).bits,
        model=str(folder),
        method=method,
        output=out,
        eval=None,
        format="gguf",
        gguf_type=kind,
        method_options=options,
        calibration=CalibrationConfig(dataset=CALIBRATION[name], samples=128, seq_len=256, seed=0),
        force=True,
    )
    start = time.perf_counter()
    quantcli.quantize(config)
    return gguf_file(out), time.perf_counter() - start


def run(
    name: str,
    threads: int,
    workdir: Path,
    save: Any,
    types: tuple[str, ...] = TYPES,
    rtn_only: bool = False,
    clip_search: bool = True,
) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    spec, folder = MODELS[name], model_folder(name)
    torch.set_num_threads(threads)
    ids = eval_ids(AutoTokenizer.from_pretrained(folder), spec["dataset"], spec["max_tokens"])
    seq_len = spec["seq_len"]
    log = lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    score = lambda path: perplexity(window_nlls(llamacpp_logits(path, seq_len, threads), ids, seq_len))  # noqa: E731
    result: dict[str, Any] = {
        "model": name,
        "complete": False,
        "note": NOTES[name],
        "rows": [],
        "quantcli_eval_of_llamacpp_q4_0": None,
        "settings": {
            "dataset": spec["dataset"],
            "tokens": len(ids),
            "seq_len": seq_len,
            "threads": threads,
            "calibration": f"{CALIBRATION[name].replace(str(REPO) + '/', '')}, 128 x 256 tokens, seed 0",
            "llamacpp_quantizer": "llama_model_quantize, default params, no imatrix",
        },
    }
    if not clip_search:
        result["settings"]["gptq"] = "--no-clip-search: exactly llama.cpp's reference scales"
    f32 = workdir / "F32.gguf"
    convert(folder, f32, "f32", spec.get("tokenizer_model"))
    base = score(f32)
    result["f32_gguf_perplexity"] = base

    def add(label: str, method: str, kind: str, path: Path, ppl: float, seconds: float | None, note: str = "") -> None:
        sizes = gguf_sizes(path)
        result["rows"].append(
            {
                "type": kind,
                "by": label,
                "method": method,
                "perplexity": ppl,
                "delta_pct": 100 * (ppl / base - 1),
                "quantize_seconds": seconds,
                "note": note,
                **sizes,
            }
        )
        log(f"{label} {kind}: {sizes['file_bytes']} bytes, perplexity {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%)")
        save(result)

    from quantcli.formats.gguf.types import TYPES as QUANTCLI_TYPES

    llamacpp_ppl: dict[str, float] = {}
    for kind in types:
        theirs = (
            workdir / f"llamacpp-{kind if kind in FTYPES else 'Q4_K_S'}.gguf"
        )  # Q4_K: llama.cpp's Q4_K_S is Q4_K but for some Q5_K
        if kind in FTYPES:
            seconds = quantize(f32, theirs, kind, threads)
            llamacpp_ppl[kind] = score(theirs)
            add("llama.cpp", "llama_model_quantize", kind, theirs, llamacpp_ppl[kind], seconds)
        if kind == "Q4_0":
            result["quantcli_eval_of_llamacpp_q4_0"] = quantcli_eval(theirs, spec, result["rows"][-1]["perplexity"])
            save(result)
        if kind not in QUANTCLI_TYPES:
            continue
        if not rtn_only:
            path, seconds = quantcli_file(
                name, folder, "gptq", kind, workdir, {} if clip_search else {"clip_search": False}
            )
            add("quantcli", "gptq", kind, path, score(path), seconds)
            if result.get("tokenizer_ids_equal") is None:
                result["tokenizer_ids_equal"] = same_ids(path, spec, ids, AutoTokenizer.from_pretrained(folder))
        path, seconds = quantcli_file(name, folder, "rtn", kind, workdir, {})
        identical, typed, total = same_tensors(path, theirs) if theirs.exists() else (0, 0, 0)
        if kind in llamacpp_ppl and identical == typed == total:
            add(
                "quantcli",
                "rtn",
                kind,
                path,
                llamacpp_ppl[kind],
                seconds,
                "every tensor byte-identical to llama.cpp's file: its perplexity",
            )
        else:
            note = (
                f"{identical} of the {typed} tensors typed as in llama.cpp's {theirs.stem[9:]} file byte-identical"
                f" ({total} tensors)"
                if typed
                else ""
            )
            add("quantcli", "rtn", kind, path, score(path), seconds, note)
    result["complete"] = True
    save(result)
    return result


def same_ids(path: Path, spec: dict[str, Any], ids: list[int], tokenizer: Any) -> bool:
    """Whether llama.cpp, with the tokenizer quantcli wrote into ``path``, gives the HF tokenizer's ids on the
    eval text."""
    text = eval_text(spec["dataset"])
    llm = llamacpp_logits(path, 8).llama
    theirs = llm.tokenize(
        text.encode("utf-8"), add_bos=tokenizer(text[:10])["input_ids"][0] == tokenizer.bos_token_id, special=False
    )
    return theirs[: len(ids)] == ids and theirs == tokenizer(text)["input_ids"]


def markdown(result: dict[str, Any]) -> str:
    s, check = result["settings"], result["quantcli_eval_of_llamacpp_q4_0"]
    lines = [
        f"# GGUF files on {result['model']}: llama.cpp's quantizer vs quantcli RTN vs quantcli GPTQ",
        "",
        f"Perplexity by llama.cpp on {s['dataset']}, {s['tokens']} tokens (benchmarks/llamacpp.py's ids), windows of"
        f" {s['seq_len']};"
        f" change vs llama.cpp's F32 GGUF ({result.get('f32_gguf_perplexity', float('nan')):.4f}). GPTQ calibration:"
        f" {s['calibration']};"
        f" GPTQ: {s.get('gptq', GPTQ_SETTINGS)}."
        f" llama.cpp: {s['llamacpp_quantizer']}. {result['note']}",
        "" if result["complete"] else "\n**Incomplete run: the rows below are all that finished.**",
        "",
        "| type | by | size on disk | bits/weight | perplexity | change | quantize s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        seconds = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.1f}"
        lines.append(
            f"| {r['type']} | {r['by']} {r['method'] if r['by'] == 'quantcli' else ''} | {r['file_bytes']:,} B |"
            f" {r['bits_per_weight']:.2f}"
            f" | {r['perplexity']:.4f} | {r['delta_pct']:+.2f}% | {seconds} | {r['note']} |"
        )
    if result.get("tokenizer_ids_equal") is not None:
        lines += [
            "",
            "llama.cpp with the tokenizer quantcli wrote gives the HF tokenizer's ids on the whole eval text:"
            f" {result['tokenizer_ids_equal']}.",
        ]
    if check:
        lines += [
            "",
            f"`quantcli eval` of llama.cpp's own Q4_0 file: {check['quantcli']:.4f} vs llama.cpp's"
            f" {check['llamacpp']:.4f} ({check['diff_pct']:+.3f}%).",
        ]
    lines += ["", "Wall-clock times on a shared 2-core machine (other jobs running)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["stories260K"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--types", nargs="+", default=list(TYPES), help="GGUF types, in the order run (default: %(default)s)"
    )
    parser.add_argument("--rtn-only", action="store_true", help="no GPTQ rows")
    parser.add_argument(
        "--no-clip-search", action="store_true", help="GPTQ rows without clip search (llama.cpp's reference scales)"
    )
    parser.add_argument("--label", help="results go to results/<model>/gguf-export-LABEL")
    args = parser.parse_args()
    chosen = functools.partial(
        run, types=tuple(args.types), rtn_only=args.rtn_only, clip_search=not args.no_clip_search
    )
    run_each(args.models, labelled("gguf-export", args.label), args.threads, chosen, markdown)


if __name__ == "__main__":
    main()
