"""The three runtimes of benchmarks/anchors.py, each making one quantized model of SmolLM2 on the held-out
protocol (benchmarks/lib/heldout.py) and returning ``(path, seconds, settings)``:

- llama.cpp's command-line tools (``make llama-tools``): ``llama-quantize`` with or without an importance
  matrix that ``llama-imatrix`` computes on quantcli's exact 64 calibration windows of 256 tokens;
- AutoRound (``make autoround``), fed the same windows as token ids, exported as compressed-tensors
  (its ``llm_compressor`` format) for plain transformers;
- quantcli itself (``quantcli.quantize``), calibrated by :func:`benchmarks.lib.heldout.calibration_config`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.gguf_harness import REPO, convert
from tests.support.models import smollm2_folder

LLAMA_TOOLS = REPO / ".llamacpp-tools" / "bin"
AUTOROUND_DIR = REPO / ".autoround"
THREADS = 2
# AutoRound's recipes (auto_round/cli/main.py RECIPES) on the protocol's 64 x 256 tokens, batch size 8 (its
# default): "rtn" is iters=0, which AutoRound runs as its optimized RTN (an imatrix-weighted scale search
# on the calibration data) unless disable_opt_rtn; "plain-rtn" forces plain round-to-nearest.
AUTOROUND_RECIPES: dict[str, dict[str, Any]] = {
    "plain-rtn": {"iters": 0, "disable_opt_rtn": True},
    "rtn": {"iters": 0},
    "light": {"iters": 50, "lr": 5e-3},
    "default": {"iters": 200},
}


def tool(name: str) -> Path:
    path = LLAMA_TOOLS / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing. Run `make llama-tools`.")
    return path


def f32_gguf(work: Path) -> tuple[Path, float]:
    """SmolLM2 as an F32 GGUF (llama.cpp's convert_hf_to_gguf.py), made once per work folder."""
    path = work / "F32.gguf"
    if path.is_file():
        return path, 0.0
    return path, convert(smollm2_folder(), path, "f32")


def f32_gguf_row(work: Path) -> tuple[Path, float, dict[str, Any]]:
    path, seconds = f32_gguf(work)
    return path, seconds, {"converter": "convert_hf_to_gguf.py --outtype f32 (seconds: 0 when reused)"}


def imatrix(work: Path) -> tuple[Path, dict[str, Any]]:
    """llama-imatrix on the calibration windows decoded to text (one text, chunks of 256 tokens, 64 chunks),
    made once per work folder; returns the file and what llama-imatrix saw (its own log's counts)."""
    import json

    out, info_file = work / "imatrix.gguf", work / "imatrix.json"
    if out.is_file() and info_file.is_file():
        return out, json.loads(info_file.read_text())
    from transformers import AutoTokenizer

    from benchmarks.lib.heldout import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    windows = calibration_windows(tokenizer)
    text = "".join(tokenizer.decode(w) for w in windows.tolist())
    (work / "calibration.txt").write_text(text, encoding="utf-8")
    src, _ = f32_gguf(work)
    command = [str(tool("llama-imatrix")), "-m", str(src), "-f", str(work / "calibration.txt"), "-o", str(out)]
    command += ["-c", "256", "-b", "256", "--chunks", str(len(windows)), "-t", str(THREADS), "--no-ppl"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"llama-imatrix failed:\n{done.stderr[-3000:]}")
    log = done.stdout + done.stderr
    (work / "imatrix.log").write_text(log)
    same = same_tokens(src, text, windows.flatten().tolist())
    info = {
        "seconds": seconds,
        "command": " ".join(Path(c).name if c.startswith("/") else c for c in command),
        "input": "the 64 calibration windows of 256 tokens decoded to text and concatenated (one file), "
        "re-tokenized by llama.cpp and cut into chunks of 256 tokens",
        "log": [line.split("I ", 1)[-1] for line in log.splitlines() if "compute_imatrix:" in line][:6],
        **same,
    }
    info_file.write_text(json.dumps(info, indent=2))
    return out, info


def same_tokens(gguf_file: Path, text: str, ids: list[int]) -> dict[str, Any]:
    """How many of quantcli's calibration ids llama.cpp's tokenizer gives back from the decoded text."""
    from tests.support.gguf_harness import llama_cpp_module

    llm = llama_cpp_module().Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "absent")
    agree = sum(a == b for a, b in zip(theirs, ids))
    prefix = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), min(len(theirs), len(ids)))
    return {
        "calibration_tokens": len(ids),
        "llamacpp_tokens_of_text": len(theirs),
        "same_position_ids": agree,
        "identical_prefix": prefix,
        "add_bos_token": add_bos,
    }


def llamacpp_file(work: Path, gguf_type: str, with_imatrix: bool) -> tuple[Path, float, dict[str, Any]]:
    src, _ = f32_gguf(work)
    settings: dict[str, Any] = {
        "quantizer": "llama-quantize (the llama.cpp vendored by llama-cpp-python 0.3.36), default options"
    }
    command = [str(tool("llama-quantize"))]
    extra = 0.0
    if with_imatrix:
        matrix, info = imatrix(work)
        command += ["--imatrix", str(matrix)]
        settings["imatrix"] = info
        extra = info["seconds"]
    out = work / f"{gguf_type}{'-imatrix' if with_imatrix else ''}.gguf"
    command += [str(src), str(out), gguf_type, str(THREADS)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode:
        raise RuntimeError(f"llama-quantize {gguf_type} failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    settings["llama_quantize_s"] = seconds
    return out, seconds + extra, settings


def autoround_model(work: Path, recipe: str, bits: int, group_size: int) -> tuple[Path, float, dict[str, Any]]:
    """AutoRound on the calibration windows (token ids, 64 x 256). Scored: its quantized weights (held in bfloat16
    on this CPU) put into the fp32 model, saved as a plain folder; bytes: its packed export (compressed-tensors
    where the columns split into whole groups, else its own auto_round format, which pads 576 to 640 at g128)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.lib.heldout import calibration_windows

    if str(AUTOROUND_DIR) not in sys.path:
        sys.path.append(str(AUTOROUND_DIR))
    try:
        import auto_round
    except ImportError as error:
        message = f"auto_round is not importable from {AUTOROUND_DIR} ({error}). Run `make autoround`."
        raise SystemExit(message) from None
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = calibration_windows(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = work / f"autoround-{recipe}-w{bits}g{group_size}"
    options = {"bits": bits, "group_size": group_size, "sym": True, **AUTOROUND_RECIPES[recipe]}
    start = time.perf_counter()
    with contextlib.chdir(work):  # its offload scratch folder (ar_work_space/) goes beside the outputs
        rounder, quantized = autoround_quantize(auto_round, model, tokenizer, windows, bits, options)
    seconds = time.perf_counter() - start
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = dict(fp32.named_modules())
    with torch.no_grad():
        for name in quantized:
            targets[name].weight.copy_(dict(rounder.model.named_modules())[name].weight.float())
    fp32.save_pretrained(out / "dequantized")
    tokenizer.save_pretrained(out / "dequantized")
    export = (
        "llm_compressor" if all(targets[name].in_features % group_size == 0 for name in quantized) else "auto_round"
    )
    with contextlib.chdir(work):
        rounder.save_quantized(output_dir=str(out / "packed"), format=export)
    settings = {
        "auto_round": auto_round.__version__,
        "recipe": recipe,
        **options,
        "nsamples": len(windows),
        "seqlen": int(windows.shape[1]),
        "batch_size": "8 (AutoRound's default)",
        "dataset": "quantcli's calibration windows as token-id tensors (benchmarks.lib.heldout.calibration_windows)",
        "torch_compile": "AutoRound's default",
        "quantized_layers": len(quantized),
        "scored": "AutoRound's quantized weights (bfloat16 in memory) in the fp32 model, saved unpacked",
        "bytes": f"its packed export, format={export}",
        "packed_path": str(out / "packed"),
    }
    return out / "dequantized", seconds, settings


def autoround_quantize(
    auto_round: Any, model: Any, tokenizer: Any, windows: Any, bits: int, options: dict[str, Any]
) -> tuple[Any, list[str]]:
    """Run AutoRound; returns it and the names of the Linear layers it quantized (those given a scale)."""
    import torch

    rounder = auto_round.AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=f"W{bits}A16",
        nsamples=len(windows),
        seqlen=windows.shape[1],
        dataset=[w[None] for w in windows],
        device_map="cpu",
        **options,
    )
    rounder.quantize()
    names = [
        name for name, m in rounder.model.named_modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "scale")
    ]
    return rounder, names


def quantcli_model(work: Path, label: str, bits: int, **fields: Any) -> tuple[Path, float, dict[str, Any]]:
    """``quantcli.quantize`` with gptq's defaults on the protocol's calibration; ``fields`` go to QuantizeConfig
    (``format``/``gguf_type`` for GGUF, ``method_options`` for the integer grid)."""
    import quantcli
    from benchmarks.lib.heldout import calibration_config
    from quantcli.config.quantize import QuantizeConfig

    out = work / f"quantcli-{label}"
    config = QuantizeConfig(
        bits=bits,
        model=str(smollm2_folder()),
        method="gptq",
        output=out,
        eval=None,
        calibration=calibration_config(),
        force=True,
        **fields,
    )
    start = time.perf_counter()
    quantcli.quantize(config)
    seconds = time.perf_counter() - start
    if fields.get("format") == "gguf":
        from quantcli.formats.gguf.writer import gguf_file

        out = gguf_file(out)
    return out, seconds, {"quantcli": "gptq defaults (act-order, clip search, damp 0.01)", **fields}
