"""Where the real model and texts of the slower tests and the benchmarks are: SmolLM2-135M-Instruct, made by
``make smollm2`` (or ``$QUANTCLI_SMOLLM2``), and WikiText-2's validation split shipped in benchmarks/data."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WIKITEXT = REPO / "benchmarks" / "data" / "wikitext-2"
SMOLLM2_ENV = "QUANTCLI_SMOLLM2"


def smollm2_folder() -> Path:
    """``$QUANTCLI_SMOLLM2``, else ``<repo>/.models/SmolLM2-135M-Instruct`` (``make smollm2`` writes it)."""
    return Path(os.environ.get(SMOLLM2_ENV) or REPO / ".models" / "SmolLM2-135M-Instruct")


SMOLLM2 = smollm2_folder()
WIKI_EVAL = WIKITEXT / "wiki.valid.eval.txt"
WIKI_CALIB = WIKITEXT / "wiki.valid.calib.txt"
