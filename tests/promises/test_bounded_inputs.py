"""Every file quantcli reads is bounded and type-checked before parsing (issue 25, class 3): a model folder
whose config.json is a FIFO or a link to /dev/zero, a tokenizer linked to /dev/zero, or a config.json
declaring 100,000 layers fails in one line within seconds, before any model is built. (GGUF headers:
tests/promises/test_gguf_integrity.py; the resume state: tests/promises/test_resume_checks.py.)"""

from __future__ import annotations

import os
import time

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.support.badfiles import copy_model, edit_json
from tests.support.hostile import cli


def quantize_argv(model):
    return ["quantize", str(model), "--bits", "4", "-o", "out", "--no-eval"]


@pytest.mark.parametrize(
    "name, make, kind",
    [
        ("config.json", lambda path: os.mkfifo(path), "a FIFO"),
        ("config.json", lambda path: path.symlink_to("/dev/zero"), "a device or socket"),
        ("tokenizer.json", lambda path: path.symlink_to("/dev/zero"), "a device or socket"),
        ("tokenizer_config.json", lambda path: path.mkdir(), "a folder"),
    ],
    ids=["config-fifo", "config-dev-zero", "tokenizer-dev-zero", "tokenizer-config-folder"],
)
def test_a_model_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, name, make, kind):
    model = copy_model(tmp_path / "model")
    (model / name).unlink()
    make(model / name)
    start = time.perf_counter()
    code, out, err = cli(quantize_argv(model), tmp_path, timeout=60)
    assert time.perf_counter() - start < 30
    assert (code, out, err) == (
        3,
        "",
        [f"error: {model / name} is {kind}, not a regular file. Replace it with the model's real {name}."],
    )
    assert not (tmp_path / "out").exists()


def test_a_huge_config_file_is_refused_by_size(tmp_path, monkeypatch):
    model = copy_model(tmp_path / "model")
    with open(model / "generation_config.json", "wb") as handle:
        handle.truncate((64 << 20) + 1)  # sparse: no disk used
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, quantize_argv(model))
    assert (result.exit_code, result.stderr) == (
        3,
        f"error: {model / 'generation_config.json'} is 67,108,865 bytes, more than the"
        f" 67,108,864 quantcli reads. Replace it with the model's real generation_config.json.\n",
    )


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "--bits", "4", "-o", "out", "--no-eval"],
        ["quantize", "--bits", "4", "--low-memory", "-o", "out"],
        ["eval", "--max-tokens", "256"],
        ["bench", "--repeats", "1"],
    ],
)
def test_a_config_declaring_100000_layers_is_refused_before_the_model_is_built(tmp_path, monkeypatch, command):
    model = copy_model(tmp_path / "model")
    edit_json(model / "config.json", num_hidden_layers=100_000)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    result = CliRunner().invoke(app, [command[0], str(model), *command[1:]])
    assert time.perf_counter() - start < 10  # building 100,000 layers takes minutes and gigabytes
    assert (result.exit_code, result.stdout) == (3, ""), result.stderr
    assert result.stderr == (
        f"error: {model} does not match its config.json: it declares 100,000 layers (num_hidden_layers) but the"
        " weights hold 5"
        " (model.layers.0 to model.layers.4); model.layers.5 onwards would be random. The checkpoint is incomplete or"
        " its"
        " config.json is wrong: re-download it or fix config.json.\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_30mb_row_is_tokenized_only_as_far_as_max_tokens_needs(tmp_path):
    """Before: the row was tokenized whole (3.7 GiB peak, 71 s on this 2-core machine); now 0.9-1.7 GiB (datasets' own
    arrow conversion of the row varies with the machine's load)."""
    import json
    import subprocess
    import sys

    from tests.support.hostile import ROOT

    sentence = "Once upon a time there was a little cat. "
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": sentence * (30_000_000 // len(sentence))}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    code = (  # the child's own peak, written when it exits (RUSAGE_CHILDREN would mix in earlier tests' children)
        "import atexit, resource, sys; from quantcli.cli.app import main;"
        " atexit.register(lambda: open('peak', 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)));"
        " sys.argv = ['quantcli', 'eval', '--dataset', 'big.jsonl', '--max-tokens', '1024', '-q', '--json']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["settings"]["max_tokens"] == 1024
    assert int((tmp_path / "peak").read_text()) < 2_500_000  # KiB: well under the 3.7 GiB of a whole-row tokenization
