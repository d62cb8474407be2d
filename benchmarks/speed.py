"""CPU decode speed of fp32 vs quantcli INT8 (int8-cpu) and INT4 (int4-cpu) weight-only kernels vs
bitsandbytes INT8 (and torchao INT8 weight-only when importable), in one run with the same prompt.

    python -m benchmarks.speed [--model gpt2-random|smollm2|FOLDER] [--prompt-tokens 64 --new-tokens 32]
        [--repeats 3 --threads 2]
    PYTHONPATH=.peers python -m benchmarks.speed --model "$QUANTCLI_SMOLLM2"   # with torchao from `make bench-peers`

``--model gpt2-random`` (default) is GPT2Config() (124M parameters) with random weights, built here:
speed does not depend on the values. ``smollm2`` or a folder (see ``benchmarks/lib/setups.py``) is used
as it is. Writes benchmarks/results/<model>/speed.{json,md}.
quantcli's checkpoints are rtn INT8 and INT4 at today's defaults (INT8 per channel, INT4 in groups of
32, ``signed`` observer, 16-bit scales, int8 embedding); the rows' labels and ``quantcli_settings`` in
the JSON come from the runs' reports. Rounds interleave
the models so load from other processes hits them alike; medians per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.lib import setups
from benchmarks.lib.results import result_stem
from quantcli.checkpoint.load import load
from quantcli.config.recipes import config_from_mapping
from quantcli.measure.speed import BenchConfig, measure
from quantcli.run.pipeline import quantize

RANDOM_GPT2 = "gpt2-random"


def build_gpt2(folder: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from quantcli.sources.models import EMBEDDED_MODEL

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder / "fp32")
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder / "fp32")  # any tokenizer: ids are given
    return folder / "fp32"


def bnb_int8(source: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        source, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    ).eval()


def torchao_int8(source: Path):
    import torchao.quantization as tq

    model = load(source, "cpu")[0]
    head = model.get_output_embeddings()
    tq.quantize_(
        model,
        tq.Int8WeightOnlyConfig(),
        filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and module is not head,
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=RANDOM_GPT2,
        help=f"{RANDOM_GPT2} (GPT2Config(), random weights), smollm2, or a model folder.",
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, 512, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    folder = None if args.model == RANDOM_GPT2 else setups.model_folder(args.model)
    output = result_stem(RANDOM_GPT2 if folder is None else setups.result_name(args.model, folder), "speed")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = build_gpt2(Path(tmp)) if folder is None else folder
        quantize_seconds, settings, grid = {}, {}, {}
        for bits in (8, 4):
            start = time.perf_counter()
            report = quantize(
                config_from_mapping(
                    {"bits": bits, "method": "rtn", "model": str(source), "output": f"{tmp}/int{bits}", "eval": None}
                )
            )
            quantize_seconds[f"int{bits}"] = time.perf_counter() - start
            group = report.options["group_size"]
            grid[bits] = f"{'per-channel' if group == -1 else f'g{group}'} {report.options['observer']}"
            settings[f"int{bits}"] = {
                **report.options,
                "embeddings": report.recipe["embeddings"],
                "keep_dtype": report.recipe["keep_dtype"],
                "grouping": (report.grouping or {}).get("summary"),
                "disk_bytes": report.size["quantized_disk_bytes"],
            }
        candidates = {
            "fp32": lambda: load(source, "cpu")[0],
            f"quantcli rtn int8 {grid[8]} (int8-cpu, weight-only)": lambda: load(
                f"{tmp}/int8", "cpu", backend="int8-cpu"
            )[0],
            f"quantcli rtn int4 {grid[4]} (int4-cpu, packed)": lambda: load(f"{tmp}/int4", "cpu", backend="int4-cpu")[
                0
            ],
            "bitsandbytes int8": lambda: bnb_int8(source),
            "torchao Int8WeightOnlyConfig": lambda: torchao_int8(source),
        }
        models = {}
        for name, build_model in candidates.items():
            try:
                models[name] = build_model()
            except Exception as error:
                results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        rounds: dict[str, list[dict]] = {name: [] for name in models}
        for index in range(args.repeats):
            for name, model in models.items():
                rounds[name].append(
                    measure(
                        model, ids, BenchConfig(args.prompt_tokens, args.new_tokens, 1, warmup=1 if index == 0 else 0)
                    )
                )
        for name, runs in rounds.items():
            results[name] = {
                key: statistics.median(run[key] for run in runs)
                if isinstance(runs[0][key], (int, float))
                else runs[0][key]
                for key in runs[0]
            }
            print(f"{name}: {results[name]['decode_tokens_per_s']:.1f} decode tokens/s", flush=True)
        dense_layers = {
            name: len(getattr(models.get(name), "cpu_kernels_dense", {}))
            for name in models
            if name.startswith("quantcli")
        }
    fp32 = results["fp32"]["decode_tokens_per_s"]
    ratios = {name: r["decode_tokens_per_s"] / fp32 for name, r in results.items() if "decode_tokens_per_s" in r}
    summary = {
        "model": "GPT2Config() defaults, random init (124M parameters)" if folder is None else folder.name,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
        },
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": 1,
        },
        "quantize_seconds": quantize_seconds,
        "quantcli_settings": settings,
        "quantcli_layers_left_dense": dense_layers,
        "results": results,
        "decode_speedup_vs_fp32": ratios,
    }
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "| model | decode tokens/s | latency ms/token | prefill tokens/s | model memory (MB) | peak memory (MB) | vs"
        " fp32 |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | n/a ({r['error']}) | | | | | |")
        else:
            lines.append(
                f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['latency_ms_per_token']:.1f} |"
                f" {r['prefill_tokens_per_s']:.0f}"
                f" | {r['model_memory_bytes'] / 1e6:.0f} | {r['peak_memory_bytes'] / 1e6:.0f} | {ratios[name]:.2f}x |"
            )
    lines.append(
        f"\n{summary['model']}; {args.threads} CPU threads, load average {summary['machine']['load_average'][0]:.1f};"
        f" {args.prompt_tokens} prompt + {args.new_tokens} new tokens, median of {args.repeats} interleaved rounds."
        f" quantcli: rtn defaults, int8 {grid[8]}, int4 {grid[4]}, {settings['int4']['keep_dtype']} kept dtype (16-bit"
        f" scales), --embeddings {settings['int4']['embeddings']};"
        " bitsandbytes and torchao keep the embedding/head fp32. The machine was shared: compare the ratios, measured"
        " in the same run."
    )
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
