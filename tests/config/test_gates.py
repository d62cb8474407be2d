"""CI gates on `quantcli quantize` and `quantcli bench`: exit 4 with one line naming the gate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantcli.config.gates import GateLimits, check_speedup, enforce, to_records
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import GateFailedError, InputError

QUANTIZE = ["quantize", "--method", "rtn", "--bits", "4", "--max-tokens", "1024", "--seq-len", "128", "--quiet"]


def run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, timeout=120)


def test_failed_ppl_gate_exits_4_after_writing(tmp_path):
    out = tmp_path / "w4"
    result = run([*QUANTIZE, "-o", str(out), "--max-ppl-increase", "2", "--max-size", "10"], tmp_path)
    assert result.returncode == 4, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: gate failed: perplexity +") and line.endswith("% > --max-ppl-increase 2%")
    assert "max-size" not in line  # only the failed gate is named
    gates = json.loads((out / "report.json").read_text())["gates"]
    assert [(g["name"], g["passed"]) for g in gates] == [("max_ppl_increase", False), ("max_size", True)]
    assert gates[0]["value"] > 2 and "gate FAILED" in result.stdout


def test_passing_gates_exit_0_and_json_records_them(tmp_path):
    result = run(
        [*QUANTIZE, "-o", str(tmp_path / "ok"), "--max-ppl-increase", "50", "--max-size", "1", "--json"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    gates = json.loads(result.stdout)["gates"]
    assert all(g["passed"] for g in gates) and {g["name"] for g in gates} == {"max_ppl_increase", "max_size"}
    assert gates[1]["value"] < 1  # MB


def test_size_gate_fails(tmp_path):
    result = run([*QUANTIZE, "--no-eval", "-o", str(tmp_path / "s"), "--max-size", "0.1"], tmp_path)
    assert result.returncode == 4
    assert (
        "size on disk 0.207 MB > --max-size 0.1 MB" in result.stderr
    )  # embedding kept 16-bit (the default), 16-bit norms and scales


def test_gate_misuse_is_input_error():
    with pytest.raises(InputError, match="Drop eval=None"):
        config_from_mapping({"bits": 4, "eval": None, "gates": {"max_ppl_increase": 2}})
    with pytest.raises(InputError, match="quantcli bench"):
        config_from_mapping({"bits": 4, "gates": {"min_speedup": 1.5}})
    with pytest.raises(InputError, match="non-negative"):
        GateLimits(max_size=-1)
    with pytest.raises(InputError, match="Pass base='MODEL'"):
        check_speedup(GateLimits(min_speedup=2), None)


def test_speedup_gate_message():
    with pytest.raises(GateFailedError, match=r"decode speedup 1.20x < gates.min_speedup 1.5x") as error:
        enforce(to_records(check_speedup(GateLimits(min_speedup=1.5), 1.2)))
    assert error.value.exit_code == 4
    enforce(to_records(check_speedup(GateLimits(min_speedup=1.5), 1.6)))
