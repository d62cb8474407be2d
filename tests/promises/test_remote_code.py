"""No code a checkpoint ships runs without --trust-remote-code, on any read path, whatever stdin holds.

transformers asks "Do you wish to run the custom code? [y/N]" on stdout when ``trust_remote_code`` is
left unset: with ``yes y |`` the code runs, with stdin closed the prompt corrupts ``--json``. So every
transformers loader call in quantcli passes the flag explicitly (checked on the source), and each
command that reads checkpoints is run in a real process with both kinds of stdin."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.badfiles import remote_code_checkpoint
from tests.support.models import REPO

ROOT = REPO
LOADERS = ("from_pretrained", "from_config", "from_dict", "from_json_file", "get_class_from_dynamic_module")


def _calls_without_flag(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            keywords = {keyword.arg for keyword in node.keywords}
            if name in LOADERS and "trust_remote_code" not in keywords and None not in keywords:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_every_transformers_loader_call_passes_the_trust_flag():
    missing = [call for path in sorted((ROOT / "quantcli").rglob("*.py")) for call in _calls_without_flag(path)]
    assert missing == []


def test_the_source_scan_finds_a_call_without_the_flag(tmp_path):
    sample = ROOT / "quantcli" / "_scan_sample.py"
    try:
        sample.write_text(
            "from transformers import AutoConfig\nAutoConfig.from_pretrained('x')\nAutoConfig.from_pretrained('x', "
            "trust_remote_code=False)\n"
        )
        assert _calls_without_flag(sample) == ["quantcli/_scan_sample.py:2 from_pretrained"]
    finally:
        sample.unlink()


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    remote_code_checkpoint(root / "ckpt", root / "ran")
    return root


COMMANDS = {
    "eval": ["eval", "ckpt", "--max-tokens", "256", "--json"],
    "eval-base": ["eval", "stories260K", "--base", "ckpt", "--max-tokens", "256", "--json"],
    "bench": ["bench", "ckpt", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--json"],
    "compare": ["compare", "ckpt", "--max-tokens", "256", "--json"],
}


@pytest.mark.parametrize("stdin", ["closed", "yes"])
@pytest.mark.parametrize("argv", list(COMMANDS.values()), ids=list(COMMANDS))
def test_remote_code_never_runs_and_nothing_is_asked(remote, argv, stdin):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "QUANTCLI_DEBUG": ""}
    result = subprocess.run(
        [sys.executable, "-m", "quantcli", *argv],
        cwd=remote,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **({"stdin": subprocess.DEVNULL} if stdin == "closed" else {"input": "y\n" * 1000}),
    )
    assert not (remote / "ran").exists(), "the checkpoint's own code ran"
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert (
        result.stderr.count("\n") == 1
        and "ships its own Python code" in result.stderr
        and "--trust-remote-code" in result.stderr
    ), result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "model", "-b", "4", "--low-memory", "-o", "out"],
        ["quantize", "tokenizer", "-b", "4", "--no-eval", "-o", "out"],
        ["eval", "tokenizer", "--max-tokens", "256"],
        ["quantize", "tokenizer", "-b", "4", "--low-memory", "-o", "out"],
    ],
    ids=["sequential", "tokenizer-quantize", "tokenizer-eval", "tokenizer-sequential"],
)
def test_every_read_path_refuses_remote_code_in_process(tmp_path, monkeypatch, argv):
    from typer.testing import CliRunner

    from quantcli.cli.app import app
    from tests.support.badfiles import remote_code_model, remote_tokenizer_model

    remote_code_model(tmp_path / "model", tmp_path / "ran")
    remote_tokenizer_model(tmp_path / "tokenizer", tmp_path / "ran")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, argv, input="y\n" * 100)
    assert not (tmp_path / "ran").exists()
    assert result.exit_code == 3 and result.stdout == "", result.output
    assert "ships its own Python code" in result.stderr and result.stderr.count("\n") == 1
