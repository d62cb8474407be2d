"""Where the repository and the real model's files are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = Path(os.environ.get("QUANTCLI_SMOLLM2") or REPO / ".models" / "SmolLM2-135M-Instruct")
WIKI_EVAL = REPO / "benchmarks" / "data" / "wikitext-2" / "wiki.valid.eval.txt"
WIKI_CALIB = REPO / "benchmarks" / "data" / "wikitext-2" / "wiki.valid.calib.txt"
