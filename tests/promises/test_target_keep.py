"""A size target is met on disk when the search keeps layers (issue 25, class 7): "keep" is written in the
dtype it is priced in, so the bytes on disk equal the prediction; a run that quantized nothing says so;
a target nothing can meet is exit 4 with the smallest achievable size; --bits with a target is refused
(tests/promises/test_unhonoured.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import GateFailedError
from quantcli.run.pipeline import quantize

FAST = {"search_tokens": 512, "verify_tokens": 1024, "probe_layers": 3}
RECIPE = {"method": "rtn", "eval": None, "calibration": {"samples": 16}}


def test_an_allocation_that_keeps_every_layer_is_written_as_priced(tmp_path):
    allocation = {"target_size": "600KB", "candidates": ["keep", "int8"], **FAST}  # keep-all, priced in 16 bits, fits
    report = quantize(config_from_mapping({**RECIPE, "allocation": allocation, "output": tmp_path / "kept"}))
    predicted = report.stats["allocation"]["result"]["bytes"]
    on_disk = (tmp_path / "kept" / "model.safetensors").stat().st_size
    # 5 blocks x 7 linears; the embedding (the head is tied to it) is kept by default, as vLLM serves it
    assert report.stats["allocation"]["result"]["choices"] == {"keep": 35}
    assert on_disk == predicted <= 600_000 and report.size["quantized_disk_bytes"] == on_disk
    assert report.bits == 16 and report.layers == {}  # nothing quantized: not "rtn, 4-bit"
    assert set(report.size["breakdown"]["classes"]["other"]["dtypes"]) == {"BF16"}


def test_a_target_nothing_can_meet_is_a_gate_failure_with_the_smallest_size(tmp_path, monkeypatch):
    with pytest.raises(
        GateFailedError, match=r"^no allocation fits 100,000 bytes: the smallest candidates give [\d,]+ bytes"
    ):
        quantize(
            config_from_mapping(
                {**RECIPE, "allocation": {"target_size": "100KB", **FAST}, "output": tmp_path / "small"}
            )
        )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["quantize", "--target-size", "100KB", "--no-eval", "--calib-samples", "16", "-o", "out"]
    )
    assert (
        result.exit_code == 4
        and result.stderr.startswith("error: no allocation fits 100,000 bytes")
        and result.stderr.count("\n") == 1
    )
    assert list(tmp_path.iterdir()) == []
