"""Decode and prefill speed of quantcli checkpoints served by vLLM CPU beside transformers (through
quantcli's own ``quantcli.measure.speed.measure``, as ``quantcli bench`` times it), one sequence, greedy, the
same prompt ids (the first ``--prompt-tokens`` tokens of the eval text), bfloat16 in both.

    make vllm
    python -m benchmarks.vllm_speed out/ckpt/rtn-int4 out/ckpt/rtn-w8a8 [--base MODEL]

transformers decompresses compressed-tensors weights at load on CPU, so its rows run dense bf16
matmuls; vLLM runs the packed weights with its CPU kernels (int4: ``CPUWNA16LinearKernel``, W8A8:
``CPUInt8ScaledMMLinearKernel``). vLLM's decode is timed as one request's total minus its prefill
(best of ``--repeats``), transformers' token by token (median). Writes results/smollm2/vllm-speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tests.support.models import REPO
from tests.support.vllm_harness import VllmError, run_vllm

RESULTS = REPO / "benchmarks" / "results" / "smollm2"


def transformers_speed(folder: str, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    import torch

    import quantcli
    from quantcli.measure.speed import BenchConfig, measure

    model = quantcli.load(folder)[0].to(torch.bfloat16)
    config = BenchConfig(prompt_tokens=len(prompt), new_tokens=new_tokens, repeats=repeats)
    result = measure(model, torch.tensor([prompt]), config)
    return {key: result[key] for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.llamacpp import eval_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--dataset", default="benchmarks/data/wikitext-2/wiki.valid.eval.txt")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for folder in args.checkpoints:
        prompt = eval_ids(AutoTokenizer.from_pretrained(folder), args.dataset, args.prompt_tokens)
        row = {"checkpoint": folder, "transformers": transformers_speed(folder, prompt, args.new_tokens, args.repeats)}
        try:
            answer = run_vllm(
                {
                    "model": folder,
                    "dtype": "bfloat16",
                    "max_model_len": args.prompt_tokens + args.new_tokens + 64,
                    "bench": {"prompt": prompt, "new_tokens": args.new_tokens, "repeats": args.repeats},
                }
            )
            row["vllm"], row["kernels"], row["versions"] = answer["bench"], answer["kernels"], answer["versions"]
        except VllmError as error:
            row["vllm_error"] = error.message
        row["load_average"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    settings = (
        f"prompt: the first {args.prompt_tokens} tokens of {args.dataset}, {args.new_tokens} new tokens, greedy,"
        f" one sequence, bfloat16, best of {args.repeats} (vLLM) / median of {args.repeats} (transformers);"
        f" {time.strftime('%Y-%m-%d')}; {os.cpu_count()} shared CPU cores (AVX512-BF16), load average per row"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm-speed.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# vLLM CPU vs transformers decode speed\n\n{settings}\n",
        "| checkpoint | transformers prefill tok/s | transformers decode tok/s | vLLM prefill tok/s"
        " | vLLM decode tok/s | vLLM kernels | load avg |",
        "|---|--:|--:|--:|--:|---|--:|",
    ]
    for row in rows:
        ours, theirs = row["transformers"], row.get("vllm")
        kernels = ", ".join(row.get("kernels") or []) or "unquantized"
        served = (
            f"{theirs['prefill_tokens_per_s']:.0f} | {theirs['decode_tokens_per_s']:.1f} | {kernels}"
            if theirs
            else f"not served | | {row['vllm_error'][:80]}"
        )
        speed = f"{ours['prefill_tokens_per_s']:.0f} | {ours['decode_tokens_per_s']:.1f}"
        lines.append(f"| {row['checkpoint']} | {speed} | {served} | {row['load_average']:.1f} |")
    (RESULTS / "vllm-speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
