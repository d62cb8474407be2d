"""One entry point: streaming (one decoder block at a time from disk) and in-memory runs share the
report, the gates and the atomic save; a gate that is given runs or is refused, never skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantcli.config.recipes import config_from_mapping
from quantcli.errors import InputError
from quantcli.run.pipeline import quantize

STREAM = "low_memory"
STREAM_FLAG = "--low-memory"


def run(*args):
    return subprocess.run([sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, timeout=300)


def test_size_gate_runs_on_a_streaming_run(tmp_path):
    out = tmp_path / "w4"
    result = run(
        "quantize",
        "--bits",
        "4",
        "--method",
        "rtn",
        STREAM_FLAG,
        "--no-eval",
        "--max-size",
        "0.1",
        "-o",
        str(out),
        "--quiet",
    )
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: gate failed: size on disk 0.")
    gates = json.loads((out / "report.json").read_text())["gates"]
    assert [(g["name"], g["passed"]) for g in gates] == [("max_size", False)]


def test_perplexity_gate_is_refused_on_a_streaming_run(tmp_path):
    result = run(
        "quantize",
        "--bits",
        "4",
        "--method",
        "rtn",
        STREAM_FLAG,
        "--max-ppl-increase",
        "2",
        "-o",
        str(tmp_path / "w4"),
        "--quiet",
    )
    assert result.returncode == 2, result.stderr
    assert "perplexity" in result.stderr and "--max-ppl-increase" in result.stderr
    assert not (tmp_path / "w4").exists()


def test_python_api_streams_when_asked(tmp_path):
    report = quantize(
        config_from_mapping(
            {
                "bits": 4,
                "method": "rtn",
                "eval": None,
                STREAM: True,
                "output": tmp_path / "s",
                "gates": {"max_size": 10},
            }
        )
    )
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()  # one shard per decoder block, not one file
    assert report.recipe[STREAM] is True and [g["name"] for g in report.gates] == ["max_size"]
    assert json.loads((tmp_path / "s" / "report.json").read_text())["gates"] == report.gates


def test_streaming_cannot_measure_perplexity():
    with pytest.raises(InputError, match="perplexity"):
        config_from_mapping({"bits": 4, STREAM: True, "eval": {"max_tokens": 1024}})


def test_sequential_is_a_deprecated_name_of_low_memory(tmp_path):
    result = run(
        "quantize", "--bits", "8", "--method", "rtn", "--sequential", "-o", str(tmp_path / "w8"), "--quiet", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert "warning: --sequential is deprecated; it is now called --low-memory." in result.stderr
    assert (
        json.loads(result.stdout)["recipe"]["low_memory"] is True
        and json.loads(result.stdout)["perplexity_after"] is None
    )


def test_method_options_not_worth_a_flag_go_through_dash_o_and_the_method_checks_them(tmp_path):
    from typer.testing import CliRunner

    from quantcli.cli.app import app
    from quantcli.config.recipes import merge_quantize_config

    config = merge_quantize_config(
        None,
        {"bits": 4, "method": "gptq"},
        {"group_size": 32},
        {},
        {},
        {},
        ["damp=0.05", "block-size=64", "act_order=false"],
    )
    assert dict(config.method_options) == {"group_size": 32, "damp": 0.05, "block_size": 64, "act_order": False}
    runner = CliRunner()
    result = runner.invoke(
        app, ["quantize", "--bits", "4", "--method", "rtn", "-O", "damp=0.05", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: option(s) damp do not apply to method rtn. Its options: activations, group_size, observer, "
        "smoothing, symmetric."
    )
    result = runner.invoke(app, ["quantize", "--bits", "4", "-O", "damp", "-o", str(tmp_path / "x")])
    assert (
        result.exit_code == 2 and result.stderr.strip() == "error: -O takes KEY=VALUE (e.g. -O damp=0.05), got 'damp'."
    )
    assert not (tmp_path / "x").exists()
