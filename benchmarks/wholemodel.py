"""Issue 14's acceptance check: quantcli's default whole-model checkpoints beside llama.cpp's Q4_0/Q8_0.

    python -m benchmarks.wholemodel                # SmolLM2 (needs `make smollm2`)
    python -m benchmarks.wholemodel --rows gptq-int4-g32 rtn-int4

Each row quantizes with quantcli's defaults (plus the row's options), reloads the checkpoint from
disk with ``quantcli.load`` and scores it on the standard windows (WikiText-2 validation articles
1-30, 16,384 tokens, windows of 512; calibration 128 × 256 from articles 31-60, seed 0). llama.cpp's
rows and the fp32 baseline are read from ``results/<model>/llamacpp.json``,
measured by ``benchmarks/llamacpp.py`` on the same token ids and windows. Sizes: quantcli's
safetensors files; llama.cpp's whole GGUF file (its tokenizer included). Rows are appended to
``results/<model>/wholemodel.json`` as they finish; the table goes to the ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import quantcli
from benchmarks.lib import setups
from benchmarks.lib.results import result_stem
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from tests.support.models import REPO

ROWS = {  # name: (method, bits, method options, QuantizeConfig fields)
    "gptq-int4": ("gptq", 4, {}, {}),
    "rtn-int8": ("rtn", 8, {}, {}),
    "rtn-int4": ("rtn", 4, {}, {}),
    "gptq-int4-g32": ("gptq", 4, {"group_size": 32}, {}),
    "gptq-int4-g32-mse": ("gptq", 4, {"group_size": 32, "observer": "mse"}, {}),
    "gptq-int4-minmax": ("gptq", 4, {"observer": "minmax"}, {}),
    "gptq-int4-signed": ("gptq", 4, {"observer": "signed"}, {}),
    "gptq-int4-emb4": ("gptq", 4, {}, {"embeddings": 4}),
    "rtn-int8-fp32-kept": ("rtn", 8, {}, {"keep_dtype": "float32"}),
    "rtn-int8-keep-embeddings": ("rtn", 8, {}, {"embeddings": "keep"}),
    "rtn-int4-keep-embeddings": ("rtn", 4, {}, {"embeddings": "keep"}),
    "gptq-int4-keep-embeddings": ("gptq", 4, {}, {"embeddings": "keep"}),
    "rtn-int8-emb8": ("rtn", 8, {}, {"embeddings": 8}),
    "gptq-int4-emb8": ("gptq", 4, {}, {"embeddings": 8}),
    "rtn-w8a8": ("rtn", 8, {"activations": "int8"}, {}),
    "rtn-w8a8-smoothquant": ("rtn", 8, {"activations": "int8", "smoothing": 0.5}, {}),
    "rtn-w8a8-smoothquant-0.8": ("rtn", 8, {"activations": "int8", "smoothing": 0.8}, {}),
    "gptq-w8a8": ("gptq", 8, {"activations": "int8"}, {}),
    "gptq-w8a8-smoothquant": ("gptq", 8, {"activations": "int8", "smoothing": 0.5}, {}),
}
SHOWN_OPTIONS = ("group_size", "observer", "activations", "smoothing")
TARGETS = {4: ("llama.cpp Q4_0", 0.5), 8: ("llama.cpp Q8_0", None)}  # size cap and increase cap (None: 0.1 %)


def llamacpp_rows(model: str) -> tuple[dict, dict[str, dict]]:
    path = result_stem(model, "llamacpp").with_suffix(".json")
    data = json.loads(path.read_text())
    return data, {row["type"]: row for row in data["rows"]}


def run_row(name: str, setup: setups.Setup, folder: Path) -> dict:
    method, bits, options, fields = ROWS[name]
    calibration = CalibrationConfig(dataset=setup.calib_dataset, samples=128, seq_len=256, seed=0)
    evaluation = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=setup.max_tokens)
    start = time.perf_counter()
    report = quantcli.quantize(
        QuantizeConfig(
            model=setup.path,
            bits=bits,
            method=method,
            method_options=options,
            calibration=calibration,
            eval=None,
            output=folder,
            **fields,
        )
    ).to_dict()
    quantize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = quantcli.evaluate(str(folder), evaluation, device="cpu")
    return {
        "row": name,
        "method": method,
        "bits": bits,
        "options": report["options"],
        "fields": fields,
        "perplexity": result["perplexity"],
        "disk_bytes": report["size"]["quantized_disk_bytes"],
        "breakdown": report["size"].get("breakdown"),
        "bits_per_weight": report["size"]["quantized_bits_per_weight"],
        "grouping": (report.get("grouping") or {}).get("summary"),
        "quantize_seconds": quantize_seconds,
        "eval_seconds": time.perf_counter() - start,
        "eval_settings": result.get("settings"),
        "tokens_scored": result.get("tokens_scored"),
    }


def judge(row: dict, fp32: float, llama: dict[str, dict]) -> dict:
    """The row's increase over fp32 and whether it meets issue 14's target at its width."""
    delta = 100 * (row["perplexity"] - fp32) / fp32
    reference, share = TARGETS.get(row["bits"], (None, None))
    if reference is None:
        return {"delta_pct": delta}
    peer = llama[reference]
    peer_delta = 100 * (peer["perplexity"] - fp32) / fp32
    cap = share * peer_delta if share else 0.1
    return {
        "delta_pct": delta,
        "target": f"<= {peer['file_bytes']:,} B and increase <= {cap:.3f}% ({reference})",
        "size_ok": row["disk_bytes"] <= peer["file_bytes"],
        "quality_ok": delta <= cap,
    }


def markdown(data: dict) -> str:
    fp32, llama = data["fp32_perplexity"], data["llamacpp"]
    lines = [
        f"# Whole-model quantization on {data['model']} (issue 14)",
        "",
        f"{data['settings_line']}",
        "",
        "| checkpoint | size on disk | bits/weight (all params) | perplexity | Δ % vs fp32 | target met |",
        "|---|--:|--:|--:|--:|---|",
        f"| fp32 (transformers, from the llama.cpp run) | {llama['HF fp32 (transformers)']['file_bytes']:,} B | 32.00"
        f" | {fp32:.4f} | | |",
    ]
    for name in ("llama.cpp Q8_0", "llama.cpp Q4_0"):
        row = llama[name]
        lines.append(
            f"| {name} | {row['file_bytes']:,} B | {row['file_bits_per_weight']:.2f} | {row['perplexity']:.4f} |"
            f" {100 * (row['perplexity'] - fp32) / fp32:+.3f}% | |"
        )
    for row in data["rows"]:
        verdict = row["judged"]
        met = ""
        if "size_ok" in verdict:
            size, quality = ("yes" if verdict[key] else "NO" for key in ("size_ok", "quality_ok"))
            met = f"size {size}, quality {quality} ({verdict['target']})"
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items() if k in SHOWN_OPTIONS and v is not None)
        label = f"quantcli {row['row']} ({options}{', ' + str(row['fields']) if row['fields'] else ''})"
        label += f"; {row['note']}" if row.get("note") else ""
        lines.append(
            f"| {label} | {row['disk_bytes']:,} B | {row['bits_per_weight']:.2f} | {row['perplexity']:.4f} |"
            f" {verdict['delta_pct']:+.3f}% | {met} |"
        )
    lines += ["", "Size breakdown of each quantcli checkpoint (bytes, share of the file's tensor bytes):", ""]
    for row in data["rows"]:
        parts = row.get("breakdown") or {}
        shares = ", ".join(
            f"{key} {value['bytes']:,} ({100 * value['share']:.1f}%)" for key, value in parts.get("classes", {}).items()
        )
        lines.append(f"- {row['row']}: {shares}")
    return "\n".join(lines) + "\n"


def shown(path: str) -> str:
    """A data path relative to the repository when it is inside it."""
    return str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument("--rows", nargs="+", default=["rtn-int8", "gptq-int4"], choices=sorted(ROWS))
    parser.add_argument("--keep-dir", type=Path, help="Write the checkpoints here (one folder per row) and keep them.")
    parser.set_defaults(model="smollm2")
    args = parser.parse_args()
    setup = setups.resolve(args)
    llama_data, llama = llamacpp_rows(setup.name)
    fp32 = llama["HF fp32 (transformers)"]["perplexity"]
    out = setup.output("wholemodel").with_suffix(".json")
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    data.update(
        {
            "model": setup.label,
            "fp32_perplexity": fp32,
            "llamacpp": {k: llama[k] for k in ("HF fp32 (transformers)", "llama.cpp Q8_0", "llama.cpp Q4_0")},
            "llamacpp_settings": llama_data["settings"],
            "caveat": setup.caveat,
            "settings_line": (
                f"Eval: {shown(setup.eval_dataset)}, first {setup.max_tokens} tokens, windows of {setup.seq_len},"
                " stream protocol;"
                f" calibration: {shown(setup.calib_dataset)}, 128 × 256 tokens, seed 0. Each quantcli checkpoint"
                " reloaded from disk with quantcli.load"
                " (identical logits to plain transformers' from_pretrained, tested). fp32 and llama.cpp rows from"
                f" results/{setup.name}/llamacpp.json (same token ids and windows). Sizes: quantcli's safetensors"
                " files; llama.cpp's whole GGUF"
                f" file. {setup.caveat} Machine: 2 shared CPU cores."
            ),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows:
            row = run_row(name, setup, (args.keep_dir or Path(tmp)) / name)
            row["judged"] = judge(row, fp32, llama)
            saved = json.loads(out.read_text())["rows"] if out.exists() else []  # rows another run wrote meanwhile
            data["rows"] = [r for r in saved if r["row"] != name] + [row]
            out.write_text(json.dumps(data, indent=2) + "\n")
            out.with_suffix(".md").write_text(markdown(data))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
