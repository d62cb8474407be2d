"""What the llama.cpp tables share (``llamacpp.py``, ``gguf_export.py``, ``gguf_eval_check.py``): each
model's note, running every model in a scratch folder with its table saved as rows finish, and
``quantcli eval`` of a GGUF file on the token ids llama.cpp scores (``tests.support.gguf_harness``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.lib.results import result_stem
from tests.support.gguf_harness import REPO

NOTES = {
    "stories260K": "ffn_down has 172 inputs, not a multiple of 32: llama.cpp keeps it F16 in every quantized type.",
    "smollm2": "SmolLM2's weights were dequantized from a Q4_1 GGUF, so Q4_1 is near-lossless on it by construction.",
}


def run_each(
    names: list[str], bench: str, threads: int, run: Callable, markdown: Callable[[dict[str, Any]], str]
) -> None:
    """``run(name, threads, workdir, save)`` per model in a scratch folder; ``save`` (called as rows finish)
    writes results/NAME/BENCH.json and .md; the final table goes to stdout."""
    for name in names:
        stem = result_stem(name, bench)

        def save(result: dict[str, Any], stem: Path = stem) -> None:
            stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(result))

        with tempfile.TemporaryDirectory(prefix=f"{bench}-{name}-") as tmp:
            print(markdown(run(name, threads, Path(tmp), save)))


def quantcli_eval(path: Path, spec: dict[str, Any], llamacpp_ppl: float) -> dict[str, Any]:
    """``quantcli eval FILE.gguf`` (transformers' GGUF loader, dequantized) on the same tokens as llama.cpp."""
    import quantcli
    from quantcli.config.quantize import EvalConfig

    dataset = spec["dataset"] if spec["dataset"].startswith("tinystories") else str(REPO / spec["dataset"])
    ppl = quantcli.evaluate(
        str(path), EvalConfig(dataset=dataset, seq_len=spec["seq_len"], max_tokens=spec["max_tokens"])
    )["perplexity"]
    return {"quantcli": ppl, "llamacpp": llamacpp_ppl, "diff_pct": 100 * (ppl / llamacpp_ppl - 1)}
