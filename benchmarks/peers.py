"""A model and its eval text through quantcli and its peers on CPU: perplexity, serialized size,
quantize time and decode speed. ``--model`` picks them (``benchmarks/lib/setups.py``): stories260K and
TinyStories by default, ``--model smollm2`` for SmolLM2 on WikiText-2.
A peer that is not installed or fails here is reported with the reason, never skipped silently.

    make bench-peers   (or: pip install --no-deps --target .peers torchao optimum-quanto hqq termcolor einops)
    PYTHONPATH=.peers python -m benchmarks.peers [--model smollm2] [--max-tokens 4096 --threads 1]

(Peers go on PYTHONPATH, not into the environment: with torchao installed, transformers imports it
and every command prints its warnings.)

Every row states its settings (quantcli's from its report) and how its size was measured: quantcli's
checkpoint on disk, hqq's ``save_quantized`` folder, and for the other peers (which write no standard
checkpoint here) the bytes of ``torch.save(model.state_dict())``. The peers keep the embedding and
output head fp32; quantcli stores them as its defaults say (``--embeddings 8``). hqq runs through its
own API: transformers 5.24's ``HqqConfig`` raises "QuantizationMethod.HQQ is not available yet".
Writes benchmarks/results/<model>/peers.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.lib import setups
from quantcli.checkpoint.load import load
from quantcli.config.quantize import EvalConfig
from quantcli.config.recipes import config_from_mapping
from quantcli.measure.evaluation import measure_perplexity
from quantcli.measure.speed import BenchConfig, measure, prompt_ids
from quantcli.progress import NullProgress
from quantcli.run.pipeline import quantize
from quantcli.sources.models import bytes_on_disk, weight_files

LINEARS = lambda model: [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # noqa: E731


def serialized_bytes(model: Any) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def quantcli_settings(report: Any) -> str:
    """What a quantcli run used, from its report: the grid, the scales' dtype and the embedding/head."""
    options, recipe = report.options, report.recipe
    grouping = report.grouping or {}
    unit = "per channel" if options.get("group_size") == -1 else f"groups of {options.get('group_size')}"
    classes = report.size["breakdown"]["classes"]
    scales = "/".join(classes["scales_and_zero_points"]["dtypes"]) or "n/a"
    embedding = "/".join(classes["embeddings"]["dtypes"]) or "n/a"
    symmetric = "symmetric" if options.get("symmetric") else "asymmetric"
    return (
        f"linears {unit}, {symmetric}, observer {options.get('observer')}, {scales} scales; embedding {embedding}"
        f" (--embeddings {recipe['embeddings']}, tied head); {grouping.get('summary', '')}".rstrip("; ")
    )


def quantcli_peer(source: str, tmp: str, bits: int, backend: str) -> Callable[[Any], Any]:
    def run(_: Any) -> Any:
        folder = f"{tmp}/quantcli-w{bits}-{backend}"
        report = quantize(
            config_from_mapping({"model": source, "bits": bits, "method": "rtn", "output": folder, "eval": None})
        )
        model = load(folder, "cpu", backend=backend)[0]
        group = report.options.get("group_size")
        grouping = "per-channel" if group == -1 else f"g{group}"
        kernel = "dequantized" if backend == "auto" else backend + " backend"
        model.peer_label = f"quantcli rtn int{bits} {grouping} {report.options.get('observer')} ({kernel})"
        model.peer_settings = quantcli_settings(report)
        model.peer_size = (
            bytes_on_disk(weight_files(folder)),
            "checkpoint on disk (safetensors)",
        )  # the checkpoint is the artifact
        return model

    return run


def bnb(source: str, kind: str) -> Callable[[Any], Any]:
    def run(_: Any) -> Any:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = (
            BitsAndBytesConfig(load_in_8bit=True)
            if kind == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        )
        return AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu").eval()

    return run


def torch_dynamic(model: Any) -> Any:
    head = model.lm_head
    quantized = torch.ao.quantization.quantize_dynamic(
        model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
    )  # a copy would untie the head
    quantized.lm_head = head  # keep the head fp32, like every other peer
    return quantized


def quanto(model: Any) -> Any:
    from optimum.quanto import freeze, qint8
    from optimum.quanto import quantize as quanto_quantize

    quanto_quantize(model, weights=qint8, exclude="lm_head")
    freeze(model)
    return model


def torchao(config_name: str) -> Callable[[Any], Any]:
    def run(model: Any) -> Any:
        import torchao.quantization as tq

        config = getattr(tq, config_name)()
        tq.quantize_(
            model, config, filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head"
        )
        return model

    return run


def hqq(tmp: str) -> Callable[[Any], Any]:
    """hqq's own API (transformers 5.24's HqqConfig raises "QuantizationMethod.HQQ is not available yet")."""

    def run(model: Any) -> Any:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        AutoHQQHFModel.quantize_model(
            model, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
        )  # skips lm_head
        folder = Path(tmp) / "hqq"
        AutoHQQHFModel.save_quantized(model, str(folder))
        model.peer_size = (sum(f.stat().st_size for f in folder.iterdir()), "hqq save_quantized folder on disk")
        return model

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    setup = setups.resolve(args)
    max_tokens = args.max_tokens or (4096 if setup.name == setups.DEMO else setup.max_tokens)
    torch.set_num_threads(args.threads)
    base, tokenizer, _ = load(setup.path, "cpu")
    eval_config = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=max_tokens)
    bench_config = BenchConfig(prompt_tokens=64, new_tokens=32, repeats=3)
    ids = prompt_ids(tokenizer, bench_config)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        head = "embedding/head fp32 (tied: one tensor)"
        peers = {  # label: (make, settings); a quantcli row's label and settings come from its report
            "fp32 (no quantization)": (lambda model: model, "fp32 weights"),
            "quantcli rtn int8 (int8-cpu backend)": (quantcli_peer(setup.path, tmp, 8, "int8-cpu"), ""),
            "quantcli rtn int8 (dequantized)": (quantcli_peer(setup.path, tmp, 8, "auto"), ""),
            "quantcli rtn int4 (dequantized)": (quantcli_peer(setup.path, tmp, 4, "auto"), ""),
            "transformers + bitsandbytes int8": (
                bnb(setup.path, "int8"),
                f"LLM.int8: int8 per row (absmax), outlier threshold 6.0; {head}",
            ),
            "transformers + bitsandbytes nf4": (
                bnb(setup.path, "nf4"),
                f"nf4 in blocks of 64, fp32 absmax, no double quant, fp32 compute; {head}",
            ),
            "torch quantize_dynamic qint8": (
                torch_dynamic,
                f"qint8 weights per tensor, int8 activations per tensor (dynamic); {head}",
            ),
            "optimum-quanto qint8 weights": (quanto, f"qint8 weights per channel, fp32 activations; {head}"),
            "torchao Int8WeightOnlyConfig": (torchao("Int8WeightOnlyConfig"), f"int8 weights per channel; {head}"),
            "torchao Int8DynamicActivationInt8WeightConfig": (
                torchao("Int8DynamicActivationInt8WeightConfig"),
                f"int8 weights per channel, int8 activations per token (dynamic); {head}",
            ),
            "hqq 4-bit g64 (hqq AutoHQQHFModel, HQQLinear)": (
                hqq(tmp),
                "asymmetric 4-bit in groups of 64, hqq's defaults (optimize=True, round_zero=True), fp32 scale/zero,"
                f" fp32 compute; {head}",
            ),
        }
        for name, (make, settings) in peers.items():
            try:
                start = time.perf_counter()
                model = make(copy.deepcopy(base))
                seconds = time.perf_counter() - start
                name = getattr(model, "peer_label", name)
                ppl = measure_perplexity(model, tokenizer, eval_config, NullProgress(), name).perplexity
                speed = measure(model, ids, bench_config)
                size, kind = getattr(model, "peer_size", None) or (
                    serialized_bytes(model),
                    "torch.save(state_dict) in memory",
                )
                rows[name] = {
                    "settings": getattr(model, "peer_settings", settings),
                    "perplexity": ppl,
                    "size_bytes": size,
                    "size_kind": kind,
                    "quantize_seconds": seconds,
                    "decode_tokens_per_s": speed["decode_tokens_per_s"],
                }
            except ImportError as error:
                rows[name] = {"settings": settings, "error": f"not installed here ({error.name or error})"}
            except Exception as error:
                rows[name] = {
                    "settings": settings,
                    "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}",
                }
            print(name, rows[name], flush=True)
            model = None
    base_ppl = rows["fp32 (no quantization)"]["perplexity"]
    output = setup.output("peers")
    summary = {
        "model": setup.label,
        "caveat": setup.caveat,
        "eval": vars(eval_config),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    unit, scale = ("KB", 1e3) if setup.name == setups.DEMO else ("MB", 1e6)
    lines = [
        f"| library / method | settings | perplexity | Δ ppl | size ({unit}) | size measured as | quantize s | decode"
        " tok/s |",
        "|---|---|--:|--:|--:|---|--:|--:|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | {row['settings']} | n/a: {row['error']} | | | | | |")
        else:
            lines.append(
                f"| {name} | {row['settings']} | {row['perplexity']:.4f} |"
                f" {100 * (row['perplexity'] / base_ppl - 1):+.2f}% |"
                f" {row['size_bytes'] / scale:.{0 if unit == 'KB' else 1}f} | {row['size_kind']} |"
                f" {row['quantize_seconds']:.2f} | {row['decode_tokens_per_s']:.1f} |"
            )
    lines.append(
        f"\n{setup.label}, {Path(setup.eval_dataset).name} {max_tokens} tokens, context {setup.seq_len};"
        f" {args.threads} CPU threads,"
        f" load average {summary['load_average'][0]:.1f}; decode: {bench_config.prompt_tokens} prompt +"
        f" {bench_config.new_tokens} new tokens, median of {bench_config.repeats}."
        " quantize s: quantcli's whole run (load, quantize, save); bitsandbytes: from_pretrained; the others:"
        " converting a loaded fp32 copy (hqq: and save_quantized)."
        f"{' ' + setup.caveat if setup.caveat else ''}"
    )
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
