"""Environment mistakes get their own exit code and one line, never "internal error": another
vocabulary as --base, a terminal that cannot encode quantcli's characters (after the checkpoint
is written), an output or --plot location that cannot be written (checked before any work)."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.sources.models import EMBEDDED_MODEL
from tests.support.models import REPO

ROOT = REPO


def test_a_base_with_another_vocabulary_is_bad_input(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(EMBEDDED_MODEL, trust_remote_code=False)
    config.vocab_size = 600
    AutoModelForCausalLM.from_config(config, trust_remote_code=False).save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL, trust_remote_code=False).save_pretrained(tmp_path / "other")
    result = CliRunner().invoke(app, ["eval", "stories260K", "--base", str(tmp_path / "other"), "--max-tokens", "256"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: --base {tmp_path / 'other'} has another vocabulary than stories260K (600 vs 512 output rows, or "
        "different tokens):"
        " KL divergence and top-1 agreement need the same tokens. Pass the model it was quantized from as --base.\n"
    )


def test_an_ascii_terminal_still_gets_the_result_and_exit_0(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "LANG": "C",
        "LC_ALL": "C",
        "PYTHONIOENCODING": "ascii",
        "QUANTCLI_DEBUG": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "quantcli", "quantize", "-b", "4", "-m", "rtn", "--max-tokens", "256", "-o", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "quantcli.json").exists()
    assert b"stories260K ? out" in result.stdout and b"perplexity" in result.stdout
    assert result.stderr == b""


def test_an_unwritable_plot_is_refused_before_evaluating(tmp_path):
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "nothing"), "--plot", "/proc/plot.png"])
    assert result.exit_code == 2 and "cannot write --plot /proc/plot.png" in result.stderr
