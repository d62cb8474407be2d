"""Every option a run cannot honour is refused in one line, exit 2 (issue 22; issue 25, class 9): a format,
a method or a target that would not use a given option says so instead of dropping it. The refusal comes
from what each format and method declares (quantcli.config.honoured), checked here on every pair that drops one."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.config.honoured import RUN_OPTIONS
from quantcli.config.quantize import QuantizeConfig
from quantcli.errors import InputError
from quantcli.formats import format_names, get_format
from quantcli.methods import available_methods
from quantcli.run.pipeline import quantize
from tests.support.hostile import cli

GGUF = ["--format", "gguf", "--gguf-type", "Q4_0"]
ROWS = [
    (
        [*GGUF, "--group-size", "64"],
        "--group-size 64 is not used with --format gguf: a GGUF type fixes its block size"
        " (32 weights; 256 for the K types). Drop --group-size 64.",
    ),
    (
        [*GGUF, "--asymmetric"],
        "--asymmetric is not used with --format gguf: a GGUF type fixes whether its blocks have an offset",
    ),
    ([*GGUF, "--symmetric"], "--symmetric is not used with --format gguf"),
    ([*GGUF, "-O", "group_size=32"], "--group-size 32 is not used with --format gguf"),
    (
        [*GGUF, "--observer", "mse"],
        "--observer mse is not used with --format gguf: each block's scale is the GGUF type's own",
    ),
    (
        [*GGUF, "--embeddings", "keep"],
        "--embeddings keep is not used with --format gguf: llama.cpp's rules pick the token",
    ),
    ([*GGUF, "--embeddings", "8"], "--embeddings 8 is not used with --format gguf"),
    ([*GGUF, "--keep-dtype", "float32"], "--keep-dtype float32 is not used with --format gguf: GGUF stores norms"),
    ([*GGUF, "--keep-dtype", "auto"], "--keep-dtype auto is not used with --format gguf"),
    (
        ["-b", "4", "-O", "group_size=32", "-g", "64"],
        "-O group_size=32 and --group-size 64 both set group_size. Give it once.",
    ),
    (
        ["-b", "4", "-O", "group_size=32", "-O", "group_size=64"],
        "-O group_size is given twice (group_size=32 and group_size=64). Give each option once.",
    ),
    (["-b", "4", "-m", "gptq", "-O", "damp=0.1", "-O", "damp=0.2"], "-O damp is given twice"),
    (["-b", "4", "-O", "bits=8"], "-O bits=8 and --bits 4 both set bits. Give it once."),
    (
        ["-b", "16", "-m", "cast", "--embeddings", "4"],
        "method cast does not use --embeddings 4 (only awq, blockround, gptq and rtn do).",
    ),
    (["-b", "16", "-m", "cast", "--keep-dtype", "float32"], "method cast does not use --keep-dtype float32"),
    (
        ["--target-size", "600KB", "-b", "4"],
        "--bits 4 is not used with --target-*: each layer's bits come from its chosen"
        " candidate (--candidates). Drop --bits.",
    ),
    (
        ["--target-size", "600KB", "-g", "64"],
        "--group-size 64 is not used with --target-*: each layer's bits and group size",
    ),
]


@pytest.mark.parametrize("argv, text", ROWS, ids=[" ".join(row[0][-2:]) for row in ROWS])
def test_an_option_the_run_cannot_honour_is_refused(tmp_path, monkeypatch, argv, text):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["quantize", "--no-eval", "-o", "out", *argv])
    assert (result.exit_code, result.stdout, result.stderr.count("\n")) == (2, "", 1), result.stderr
    assert result.stderr.startswith(f"error: {text}")
    assert list(tmp_path.iterdir()) == []


def test_the_issue_case_in_a_real_process(tmp_path):
    code, out, err = cli(["quantize", "-o", "out", *GGUF, "--group-size", "64"], tmp_path)
    assert (code, out, err) == (2, "", [f"error: {ROWS[0][1]}"])
    assert list(tmp_path.iterdir()) == []


def test_every_declared_option_is_one_a_run_can_be_given():
    """The declarations name real options: a typo there would silently stop a refusal."""
    method_options = {name for cls in available_methods() for name in cls.config_class.__dataclass_fields__}
    for name in format_names():
        assert set(get_format(name).fixed_options) <= method_options | set(RUN_OPTIONS), name
    for cls in available_methods():
        assert set(cls.run_options) <= set(RUN_OPTIONS), cls.name


def test_the_python_api_refuses_the_same(tmp_path):
    with pytest.raises(InputError, match=r"^embeddings='keep' is not used with format='gguf'"):
        quantize(
            QuantizeConfig(bits=4, format="gguf", gguf_type="Q4_0", embeddings="keep", eval=None, output=tmp_path / "o")
        )
    with pytest.raises(InputError, match=r"^group_size=64 is not used with format='gguf'"):
        quantize(
            QuantizeConfig(
                bits=4,
                format="gguf",
                gguf_type="Q4_0",
                method_options={"group_size": 64},
                eval=None,
                output=tmp_path / "o",
            )
        )
    assert list(tmp_path.iterdir()) == []
