"""benchmarks/anchors.py without running a quantizer: every issue-26 anchor has a row, the sizes it reports
come from the file (a stories260K GGUF and safetensors folder), and its table renders what a row holds."""

from __future__ import annotations

import pytest

from benchmarks import anchors
from benchmarks.lib.heldout import SETTINGS
from tests.support.gguf_files import write_llama_gguf


def test_every_anchor_has_a_row():
    rows = anchors.rows()
    for kind in ("q4_0", "q4_k_m", "q3_k_m", "iq4_xs"):
        assert rows[f"llamacpp-{kind}"].method == "llama-quantize"
        assert rows[f"llamacpp-{kind}-imatrix"].method == "llama-quantize + imatrix"
    for grid in ("w4g128", "w4g64", "w3g64"):
        assert {f"autoround-{recipe}-{grid}" for recipe in ("plain-rtn", "rtn", "light", "default")} <= set(rows)
        assert rows[f"quantcli-gptq-{grid}"].runtime == "quantcli"
    assert "quantcli-gptq-q3_k_m" not in rows  # quantcli writes no Q3_K_M yet
    assert all(spec.make is not None for name, spec in rows.items() if name != "fp32")


def test_sizes_count_the_decoder_linears(stories_path, tmp_path):
    gguf = write_llama_gguf(stories_path, tmp_path / "F32.gguf")
    found = anchors.sizes(gguf)
    # stories260K: 5 blocks of q, o [64, 64], k, v [32, 64], gate, up [172, 64], down [64, 172], all F32
    assert found["linear_bytes"] == 4 * 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)
    assert found["file_bytes"] == gguf.stat().st_size
    folder = anchors.sizes(type(gguf)(stories_path))
    assert folder["linear_bytes"] == found["linear_bytes"]  # the same weights, fp32 safetensors


def test_markdown_renders_each_row():
    row = {
        "row": "llamacpp-q4_0-imatrix",
        "runtime": "llama.cpp",
        "method": "llama-quantize + imatrix",
        "grid": "Q4_0",
        "file_bytes": 91_700_000,
        "linear_bytes": 60_000_000,
        "bits_per_weight": 5.45,
        "perplexity": 50.1,
        "increase_pct": 10.6,
        "kl_divergence": 0.0812,
        "top1_agreement": 0.87,
        "quantize_s": 95.2,
    }
    result = {"settings": SETTINGS, "machine": {}}
    table = anchors.markdown({**result, "rows": [row, {**row, "row": "fp32", "kl_divergence": None}]})
    assert "| llamacpp-q4_0-imatrix | llama.cpp | llama-quantize + imatrix | Q4_0 | 91,700,000 | 60,000,000 |" in table
    assert "| 50.100 | +10.60% | 0.0812 | 0.870 | 95 |" in table
    assert "| fp32 |" in table and "| +10.60% |  | 0.870 |" in table


@pytest.mark.parametrize("gguf", [True, False])
def test_base_is_the_gguf_f32_for_gguf_rows(gguf):
    result = {"rows": [{"row": "fp32", "perplexity": 46.0}, {"row": "llamacpp-f32", "perplexity": 45.9}]}
    assert anchors.base_perplexity(result, gguf) == (45.9 if gguf else 46.0)
