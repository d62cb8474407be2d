"""Expert quantization on real weights: SmolLM2-135M and its upcycled Mixtral (``make smollm2-moe``: 4
experts, each a copy of the dense MLP, random router, top-2 renormalised), rtn and gptq int4 (groups of
32, bfloat16 scales, the embedding int8), bits per weight and perplexity against the fp32 model.

    python -m benchmarks.moe [--max-tokens 4096] [--samples 32]   # writes results/smollm2/moe.json
    python -m benchmarks.moe --gguf Q4_K_M                        # writes results/smollm2/moe-gguf.json
    python -m benchmarks.moe --bits --dtype bfloat16              # writes results/smollm2/moe-bits.json

Both models compute the same function in fp32 (tests/promises/test_smollm2_moe.py), so the dense rows are the
bar: the MoE quantizes 4 copies of every MLP, each expert calibrated on the tokens routed to it.
Evaluation: WikiText-2 validation articles 1-30 in windows of 512; calibration: articles 31-60.

``--gguf TYPE``: quantcli's rtn GGUF of the MoE (experts stacked as llama.cpp's ``ffn_*_exps``) scored by
llama.cpp (default F16 KV cache, and an F32 one) and by ``quantcli eval`` of the same file on the token ids
and windows of every llama.cpp check (tests/support/gguf_harness.py MODELS["smollm2"]: WikiText eval text,
16,384 tokens, windows of 512), against llama.cpp's own conversion (F32: the base perplexity) and its own
quantization of it (``llama_model_quantize``: are the files' tensors identical?).

``--bits``: rtn int4 of both models without evaluation, for bits per weight alone: over every tensor, and
over the int4 layers only (their codes and scales in the checkpoint, per weight), in the asked ``--dtype``,
the embedding int8 or (``--embeddings 4``) on the layers' own int4 grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.setups import SMOLLM2_CAVEAT
from tests.support.models import REPO, WIKITEXT, smollm2_folder

SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def smollm2_moe_folder() -> Path:
    """``$QUANTCLI_SMOLLM2_MOE``, else ``<repo>/.models/SmolLM2-135M-MoE`` (``make smollm2-moe`` writes it)."""
    return Path(os.environ.get("QUANTCLI_SMOLLM2_MOE") or REPO / ".models" / "SmolLM2-135M-MoE")


def main() -> None:
    import quantcli
    from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
    from quantcli.measure.evaluation import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=32, help="gptq calibration windows of 256 tokens")
    parser.add_argument("--models", nargs="+", default=["dense", "moe"])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--gguf", help="instead: the MoE as this GGUF type, scored by llama.cpp and quantcli")
    parser.add_argument("--bits", action="store_true", help="instead: bits per weight of rtn int4, no evaluation")
    parser.add_argument("--dtype", default="auto", help="with --bits: the dtype models are loaded in")
    parser.add_argument("--embeddings", type=int, default=8, help="with --bits: the embedding's bits (8 or 4)")
    args = parser.parse_args()
    if args.gguf:
        gguf_row(args.gguf)
        return
    if args.bits:
        bits_rows(args.models, args.dtype, args.embeddings)
        return
    folders = {"dense": smollm2_folder(), "moe": smollm2_moe_folder()}
    evaluation = EvalConfig(dataset=str(WIKITEXT / "wiki.valid.eval.txt"), seq_len=512, max_tokens=args.max_tokens)
    calibration = CalibrationConfig(dataset=str(WIKITEXT / "wiki.valid.calib.txt"), samples=args.samples, seq_len=256)
    out = REPO / "benchmarks" / "results" / "smollm2" / "moe.json"
    rows = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    for model in args.models:
        original = evaluate(str(folders[model]), evaluation, device="cpu")
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                report = quantcli.quantize(
                    QuantizeConfig(
                        bits=4,
                        method=method,
                        model=str(folders[model]),
                        output=Path(tmp) / "q",
                        eval=None,
                        device="cpu",
                        calibration=calibration,
                        embeddings=8,
                    )
                )
                seconds = time.perf_counter() - start
                after = evaluate(str(Path(tmp) / "q"), evaluation, device="cpu")
            row = {
                "model": model,
                "method": method,
                "bits": 4,
                "perplexity_fp32": original["perplexity"],
                "perplexity": after["perplexity"],
                "increase_pct": 100 * (after["perplexity"] / original["perplexity"] - 1),
                "bits_per_weight": report.size["breakdown"]["bits_per_weight"],
                "quantize_s": round(seconds, 1),
                "quantized_share": report.weights["quantized_share"],
                "tokens_per_expert": report.stats.get("tokens_per_expert"),
                "experts_rounded_to_nearest": report.stats.get("experts_rounded_to_nearest"),
            }
            rows = [r for r in rows if (r["model"], r["method"]) != (model, method)] + [row]
            print(json.dumps({key: value for key, value in row.items() if key != "tokens_per_expert"}), flush=True)
            out.write_text(
                json.dumps(
                    {
                        "settings": {
                            "eval": {
                                "dataset": "wiki.valid.eval.txt",
                                "seq_len": 512,
                                "tokens": original["tokens_scored"],
                            },
                            "calibration": {"dataset": "wiki.valid.calib.txt", "samples": args.samples, "seq_len": 256},
                            "grid": "int4 symmetric, groups of 32, bf16 scales (experts: fp32), int8 embedding",
                            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU, fp32",
                            "caveat": SMOLLM2_CAVEAT,
                        },
                        "rows": rows,
                    },
                    indent=2,
                )
                + "\n"
            )


def int4_layer_bits(folder: Path, report: Any) -> float:
    """Bits per weight of the int4 layers alone: their tensors' bytes in the checkpoint (packed codes,
    scales, shapes) over their weights; the embedding's (int8) are not counted."""
    from safetensors import safe_open

    tables = ("model.embed_tokens", "lm_head")
    int4 = [
        layer
        for name, layer in report.layers.items()
        if layer.bits == 4 and layer.shape and not name.startswith(tables)
    ]
    stored = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key.rpartition(".")[2].startswith("weight_") and not key.startswith(
                    ("model.embed_tokens", "lm_head")
                ):
                    part = handle.get_slice(key)
                    stored += math.prod(part.get_shape()) * SAFETENSORS_BYTES[part.get_dtype()]
    return 8 * stored / sum(math.prod(layer.shape) for layer in int4)


def bits_rows(models: list[str], dtype: str, embeddings: int) -> None:
    import quantcli
    from quantcli.config.quantize import QuantizeConfig

    folders = {"dense": smollm2_folder(), "moe": smollm2_moe_folder()}
    out = REPO / "benchmarks" / "results" / "smollm2" / "moe-bits.json"
    rows = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = quantcli.quantize(
                QuantizeConfig(
                    bits=4,
                    method="rtn",
                    model=str(folders[model]),
                    output=Path(tmp) / "q",
                    eval=None,
                    device="cpu",
                    dtype=dtype,
                    embeddings=embeddings,
                )
            )
            row = {
                "model": model,
                "method": "rtn",
                "grid": f"W4 g32 symmetric, embedding int{embeddings}",
                "dtype": dtype,
                "scale_dtypes": report.size["breakdown"]["classes"]["scales_and_zero_points"]["dtypes"],
                "file_bytes": report.size["quantized_disk_bytes"],
                "bits_per_weight": report.size["breakdown"]["bits_per_weight"],
                "int4_layer_bits_per_weight": int4_layer_bits(Path(tmp) / "q", report),
                "embedding_bytes_share": report.size["breakdown"]["classes"]["embeddings"]["share"],
                "quantize_s": round(time.perf_counter() - start, 1),
            }
        rows = [r for r in rows if (r["model"], r["dtype"], r["grid"]) != (model, dtype, row["grid"])] + [row]
        print(json.dumps(row), flush=True)
        settings = {"machine": machine(), "caveat": SMOLLM2_CAVEAT, "note": "rtn, no evaluation: sizes only"}
        out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


def machine() -> str:
    """The CPU's model name and the flags that decide its kernels (``lscpu``)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = [f for f in fields.get("Flags", "").split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")]
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores (shared), flags {' '.join(flags)}"


def gguf_row(gguf_type: str) -> None:
    from transformers import AutoTokenizer

    import quantcli
    from quantcli.config.quantize import EvalConfig, QuantizeConfig
    from tests.support.gguf_harness import (
        MODELS,
        convert,
        eval_ids,
        gguf_sizes,
        llamacpp_logits,
        perplexity,
        quantize,
        same_tensors,
        window_nlls,
    )

    spec, folder = MODELS["smollm2"], smollm2_moe_folder()
    ids = eval_ids(AutoTokenizer.from_pretrained(folder), spec["dataset"], spec["max_tokens"])

    def llamacpp(path: Path, **options) -> float:
        return perplexity(window_nlls(llamacpp_logits(path, spec["seq_len"], 2, **options), ids, spec["seq_len"]))

    row: dict = {"model": "moe", "runtime": "llama.cpp and quantcli", "method": "rtn", "grid": gguf_type}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantcli.quantize(
            QuantizeConfig(
                bits=4,
                model=str(folder),
                method="rtn",
                output=Path(tmp) / "q",
                eval=None,
                format="gguf",
                gguf_type=gguf_type,
                device="cpu",
            )
        )
        row["quantize_s"] = round(time.perf_counter() - start, 1)
        ours = Path(tmp) / "q" / f"model-{gguf_type}.gguf"
        sizes = gguf_sizes(ours)
        row.update(file_bytes=sizes["file_bytes"], bits_per_weight=sizes["bits_per_weight"])
        row["tensor_types"] = sizes["tensor_types"]
        row["perplexity_llamacpp"] = llamacpp(ours)
        row["perplexity_llamacpp_f32_kv"] = llamacpp(ours, type_k=0, type_v=0)
        evaluation = EvalConfig(dataset=str(REPO / spec["dataset"]), seq_len=spec["seq_len"], max_tokens=len(ids))
        row["perplexity_quantcli"] = quantcli.evaluate(str(ours), evaluation, device="cpu")["perplexity"]
        row["diff_pct"] = 100 * (row["perplexity_llamacpp"] / row["perplexity_quantcli"] - 1)
        row["diff_pct_f32_kv"] = 100 * (row["perplexity_llamacpp_f32_kv"] / row["perplexity_quantcli"] - 1)
        _save_gguf_row(row, ids, spec)  # the acceptance numbers first, then llama.cpp's own file beside them
        convert(folder, Path(tmp) / "f32.gguf", "f32")
        row["perplexity_llamacpp_f32"] = llamacpp(Path(tmp) / "f32.gguf")
        row["increase_pct"] = 100 * (row["perplexity_llamacpp"] / row["perplexity_llamacpp_f32"] - 1)
        quantize(Path(tmp) / "f32.gguf", Path(tmp) / "theirs.gguf", gguf_type, 2)
        identical, typed, total = same_tensors(ours, Path(tmp) / "theirs.gguf")
        row["tensors_identical_to_llamacpps_own"] = f"{identical} of {total}"
    _save_gguf_row(row, ids, spec)


def _save_gguf_row(row: dict, ids: list[int], spec: dict) -> None:
    print(json.dumps(row), flush=True)
    settings = {
        "eval": {"dataset": spec["dataset"], "seq_len": spec["seq_len"], "tokens": len(ids)},
        "quantcli_eval": "quantcli eval FILE.gguf: quantcli.sources.gguf_experts, dequantized by gguf-py, fp32",
        "llamacpp": "llama-cpp-python 0.3.36 (.llamacpp), 2 threads, windows fed with no BOS added",
        "machine": machine(),
        "caveat": SMOLLM2_CAVEAT,
    }
    out = REPO / "benchmarks" / "results" / "smollm2" / "moe-gguf.json"
    rows = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    rows = [r for r in rows if r["grid"] != row["grid"]] + [row]
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
