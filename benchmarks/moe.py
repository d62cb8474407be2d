"""Expert quantization on real weights: SmolLM2-135M and its upcycled Mixtral (``make smollm2-moe``: 4
experts, each a copy of the dense MLP, random router, top-2 renormalised), rtn and gptq int4 (groups of
32, bfloat16 scales, the embedding int8), bits per weight and perplexity against the fp32 model.

    python -m benchmarks.moe [--max-tokens 4096] [--samples 32]   # writes results/smollm2/moe.json

Both models compute the same function in fp32 (tests/promises/test_smollm2_moe.py), so the dense rows are the
bar: the MoE quantizes 4 copies of every MLP, each expert calibrated on the tokens routed to it.
Evaluation: WikiText-2 validation articles 1-30 in windows of 512; calibration: articles 31-60.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.lib.setups import SMOLLM2_CAVEAT
from tests.support.models import REPO, WIKITEXT, smollm2_folder


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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
