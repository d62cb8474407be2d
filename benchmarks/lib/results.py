"""Where results go: ``benchmarks/results/<model>/<bench>.{json,md,png}``, one folder per model
(``smollm2``, ``stories260K``, ``gpt2-random``, ``synthetic-llama``, or a model folder's name) and the
benchmark's name, with a label after it for a run with other settings (``gguf-export-q4_1``)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def result_stem(model: str, bench: str) -> Path:
    """``results/<model>/<bench>`` without a suffix; the model's folder is created."""
    folder = RESULTS / model
    folder.mkdir(parents=True, exist_ok=True)
    return folder / bench


def labelled(bench: str, label: str | None) -> str:
    """``bench`` or ``bench-label``: a run with other settings than the suite's default."""
    return f"{bench}-{label}" if label else bench
