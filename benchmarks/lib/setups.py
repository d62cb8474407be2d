"""Which model and text a benchmark runs on: ``--model stories260K`` (the embedded demo) or
``--model smollm2`` (SmolLM2-135M-Instruct, made by ``make smollm2``), or any model folder.

The real-model settings every table shares: evaluate on WikiText-2 validation articles 1-30
(``benchmarks/data/wikitext-2/wiki.valid.eval.txt``), 16,384 tokens in windows of 512; calibrate on
articles 31-60 (``wiki.valid.calib.txt``) with the methods' defaults (128 windows of 256 tokens).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks.lib.results import result_stem
from tests.support.models import SMOLLM2_ENV, WIKITEXT, smollm2_folder

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "tiny-shakespeare" / "heldout.txt"
"""Held-out text of the quantizer comparisons (issue 26): another domain than the WikiText-2 calibration half."""
DEMO = "stories260K"  # the embedded model: the default of every suite that takes --model
SMOLLM2_CAVEAT = (
    "SmolLM2's weights were dequantized from the Q4_1 GGUF it ships as (blocks of 32 inputs, asymmetric),"
    " so llama.cpp's Q4_1 is near-lossless on it by construction (an integer zero point cannot hit Q4_1's"
    " float minimum: quantcli's asymmetric g32 is not); symmetric formats, g64/g128, per-channel, 3-bit and 8-bit are"
    " meaningful."
)


@dataclass(frozen=True)
class Setup:
    name: str  # names the results folder: results/<name>/<benchmark>.{json,md}
    label: str
    path: str
    eval_dataset: str
    calib_dataset: str
    seq_len: int
    max_tokens: int
    caveat: str = ""

    def output(self, benchmark: str) -> Path:
        return result_stem(self.name, benchmark)


def model_folder(model: str) -> Path:
    """The folder ``--model`` names (``smollm2`` or a path); exits with the fix when it holds no model."""
    folder = smollm2_folder() if model == "smollm2" else Path(model)
    if not (folder / "config.json").is_file():
        fix = f"run `make smollm2` or set {SMOLLM2_ENV}" if model == "smollm2" else "pass a model folder"
        raise SystemExit(f"{folder} holds no model: {fix}.")
    return folder


def result_name(model: str, folder: Path) -> str:
    return "smollm2" if model == "smollm2" else folder.name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEMO, help="stories260K, smollm2 (via $QUANTCLI_SMOLLM2 or .models/), or a model folder."
    )
    parser.add_argument(
        "--eval-data", help="Evaluation text (default: the model's; WikiText-2 eval half for real models)."
    )
    parser.add_argument(
        "--calib-data", help="Calibration text (default: the model's; WikiText-2 calibration half for real models)."
    )
    parser.add_argument("--seq-len", type=int, help="Evaluation window (default 256 for stories260K, 512 otherwise).")
    parser.add_argument(
        "--max-tokens", type=int, help="Evaluation tokens (default 32768 for stories260K, 16384 otherwise)."
    )


def resolve(args: argparse.Namespace) -> Setup:
    """The model folder and data the arguments name; a missing SmolLM2 says how to make it."""
    if args.model == DEMO:
        from quantcli.sources.models import EMBEDDED_MODEL

        base = Setup(DEMO, DEMO, str(EMBEDDED_MODEL), "tinystories:eval", "tinystories:calib", 256, 32768)
    else:
        folder = model_folder(args.model)
        base = Setup(
            result_name(args.model, folder),
            folder.name,
            str(folder),
            str(WIKITEXT / "wiki.valid.eval.txt"),
            str(WIKITEXT / "wiki.valid.calib.txt"),
            512,
            16384,
            SMOLLM2_CAVEAT if args.model == "smollm2" else "",
        )
    return Setup(
        base.name,
        base.label,
        base.path,
        args.eval_data or base.eval_dataset,
        args.calib_data or base.calib_dataset,
        args.seq_len or base.seq_len,
        args.max_tokens or base.max_tokens,
        base.caveat,
    )
