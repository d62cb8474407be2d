"""Peak memory of streaming (--low-memory: one decoder block at a time from disk) against in-memory
quantization, for RTN and GPTQ, on a synthetic Llama.

Builds a random Llama on disk (default 24 layers of hidden 512, untied head, fp32, sharded), then
quantizes it to INT4 both ways with each method, each run in a fresh process (GPTQ calibrated on
``--calib-samples`` windows of ``--calib-seq-len`` tokens, the same for both ways), and records that
process's peak RSS (``VmHWM``; not ``ru_maxrss``, which a child inherits from its parent across
fork+exec), its RSS after the imports (the baseline every quantcli process pays), the model size on
disk and the largest single layer group. VmHWM includes the pages of memory-mapped safetensors files
the run has read (page cache the kernel can drop), so each run also samples its anonymous RSS
(``RssAnon``, the memory it allocated) and file-backed RSS (``RssFile``) every 20 ms and keeps their
peaks. Writes ``benchmarks/results/synthetic-llama/scale.json`` and ``.md``.

``--model smollm2`` (or a folder; see ``benchmarks/lib/setups.py``) measures that model instead, as it is
on disk, calibrating GPTQ on its calibration text (WikiText-2's calibration half), and writes
``results/<model>/scale.json`` and ``.md``. The quantize settings are quantcli's defaults for INT4.

    HF_HUB_OFFLINE=1 python -m benchmarks.scale [--layers 24 --hidden 512 --methods rtn gptq]
    HF_HUB_OFFLINE=1 python -m benchmarks.scale --model smollm2 --calib-samples 32 --calib-seq-len 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.lib import setups
from benchmarks.lib.results import labelled, result_stem

SYNTHETIC = "synthetic-llama"  # the results folder of the synthetic Llama
CHILD = r"""
import json, sys, time
import psutil, torch, transformers, compressed_tensors, safetensors.torch
from quantcli.config.recipes import config_from_mapping
from quantcli.run.pipeline import quantize
import threading
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for key, value in status().items():
            peaks[key] = max(peaks[key], value)
        time.sleep(0.02)
baseline = psutil.Process().memory_info().rss
before = status()
threading.Thread(target=sample, daemon=True).start()
method, mode, model, output, samples, seq_len, options, dataset, threads = sys.argv[1:10]
torch.set_num_threads(int(threads))
recipe = {"model": model, "bits": 4, "method": method, "eval": None, "output": output,
          "low_memory": mode == "streaming",
          "calibration": {"samples": int(samples), "seq_len": int(seq_len), "dataset": dataset},
          **(json.loads(options) if method != "rtn" else {})}
start = time.perf_counter()
quantize(config_from_mapping(recipe))
seconds = time.perf_counter() - start
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"baseline_rss": baseline, "peak_rss": int(hwm.split()[1]) * 1024, "seconds": seconds,
                  "baseline_anon_rss": before["RssAnon"], "peak_anon_rss": peaks["RssAnon"],
                  "baseline_file_rss": before["RssFile"], "peak_file_rss": peaks["RssFile"]}))
"""


def build(folder: Path, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantcli.sources.models import EMBEDDED_MODEL

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder)


def largest_group(folder: Path) -> int:
    from safetensors import safe_open

    from quantcli.quant.blockwise import decoder_blocks
    from quantcli.run.source_shards import shard_groups, source_tensors
    from quantcli.safetensors_dtypes import tensor_bytes
    from quantcli.sources.models import skeleton

    where = source_tensors(str(folder))
    model = skeleton(str(folder), None, False)
    prefix, blocks = decoder_blocks(model, tuple(name for name, _ in model.named_modules() if name.endswith("_proj")))
    sizes = {}
    for name, file in where.items():
        with safe_open(file, framework="pt") as handle:
            sizes[name] = tensor_bytes(handle, name)
    return max(sum(sizes[name] for name in group) for group in shard_groups(list(where), prefix, len(blocks)))


def measure(
    method: str,
    mode: str,
    model: Path,
    output: Path,
    samples: int,
    seq_len: int,
    options: dict,
    dataset: str,
    threads: int,
) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [
        method,
        mode,
        str(model),
        str(output),
        str(samples),
        str(seq_len),
        json.dumps(options),
        dataset,
        str(threads),
    ]
    result = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(result: dict, label: str) -> str:
    """The memory table: peak RSS of each run against its post-import baseline and the model's size."""
    mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
    lines = [
        "| method | mode | RSS after imports (MB) | peak RSS, VmHWM (MB) | peak / model size | work = peak - after"
        " imports (MB) | work / model size |"
        " anonymous work (MB) | anonymous work / model size | file-backed work (MB) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, run in result["runs"].items():
        method, mode = name.split(" ", 1)
        lines.append(
            f"| {method} int4 | {mode} | {mb(run['baseline_rss'])} | {mb(run['peak_rss'])} |"
            f" {run['peak_rss_over_model_size']:.2f} | {mb(run['work_rss'])} |"
            f" {run['work_rss_over_model_size']:.2f} | {mb(run['work_anon_rss'])} |"
            f" {run['work_anon_rss_over_model_size']:.2f} | {mb(run['work_file_rss'])} |"
        )
    calibration = result["gptq_calibration"]
    lines.append(
        f"\n{label}: model {mb(result['model_bytes'])} MB on disk (fp32 safetensors), largest layer group"
        f" {mb(result['largest_layer_group_bytes'])} MB."
        " quantcli's INT4 defaults; each run in its own process: peak RSS is its VmHWM, anonymous and file-backed RSS"
        " peaks sampled every 20 ms, work = peak - after imports"
        " (file-backed: libraries, and the mapped safetensors pages read, which the kernel can drop)."
        f" GPTQ calibrated on {calibration['samples']} windows of"
        f" {calibration['seq_len']} tokens of {Path(calibration['dataset']).name} (the default is 128; its time is not"
        f" reported here), options {calibration['options'] or 'default'};"
        f" {calibration['threads']} torch thread(s)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument(
        "--no-clip-search",
        action="store_true",
        help="GPTQ without its clip search (about 10x faster; same for both ways)",
    )
    parser.add_argument("--model", help="smollm2 or a model folder, instead of the synthetic Llama.")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads in each run.")
    parser.add_argument("--label", help="Writes results/<model>/scale-LABEL.{json,md} (a run with other settings).")
    parser.add_argument("--out", type=Path, help="Default: results/<model>/scale[-LABEL].json (and .md beside it).")
    args = parser.parse_args()
    folder = setups.model_folder(args.model) if args.model else None
    model_name = setups.result_name(args.model, folder) if folder else SYNTHETIC
    out = args.out or result_stem(model_name, labelled("scale", args.label)).with_suffix(".json")
    dataset = str(setups.WIKITEXT / "wiki.valid.calib.txt") if folder else "tinystories:calib"
    gptq_options = {"clip_search": False} if args.no_clip_search else {}
    with tempfile.TemporaryDirectory() as tmp:
        model = folder or Path(tmp) / "llama"
        if folder is None:
            build(model, args.layers, args.hidden)
        model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        group_bytes = largest_group(model)
        runs = {
            f"{method} {mode}": measure(
                method,
                mode,
                model,
                Path(tmp) / f"{method}-{mode}",
                args.calib_samples,
                args.calib_seq_len,
                gptq_options,
                dataset,
                args.threads,
            )
            for method in args.methods
            for mode in ("streaming", "in-memory")
        }
    for run in runs.values():
        run["work_rss"] = run["peak_rss"] - run["baseline_rss"]
        run["peak_rss_over_model_size"] = round(run["peak_rss"] / model_bytes, 3)
        run["work_rss_over_model_size"] = round(run["work_rss"] / model_bytes, 3)
        run["work_rss_over_largest_group"] = round(run["work_rss"] / group_bytes, 2)
        run["work_anon_rss"] = run["peak_anon_rss"] - run["baseline_anon_rss"]
        run["work_anon_rss_over_model_size"] = round(run["work_anon_rss"] / model_bytes, 3)
        run["work_file_rss"] = run["peak_file_rss"] - run["baseline_file_rss"]
    result = {
        "model": {"folder": folder.name}
        if folder
        else {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": 3 * args.hidden,
            "vocab": 8192,
            "dtype": "float32",
        },
        "model_bytes": model_bytes,
        "largest_layer_group_bytes": group_bytes,
        "gptq_calibration": {
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "dataset": dataset,
            "threads": args.threads,
            "options": gptq_options,
        },
        "runs": runs,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "notes": "baseline_rss: RSS after importing torch/transformers/quantcli, before any work."
        " work_rss = peak_rss - baseline_rss."
        " The machine was shared with other jobs: seconds are noisy, memory is not."
        + (
            f" GPTQ's seconds are for {args.calib_samples} calibration windows, not the default 128: not its default"
            " time."
            if args.calib_samples != 128
            else ""
        ),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        markdown(result, folder.name if folder else f"synthetic Llama, {args.layers} layers of hidden {args.hidden}")
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
