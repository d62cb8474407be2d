"""The CLI as a user meets it: JSON on stdout, one-line errors with documented exit codes, no debris."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.support.models import REPO

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_quantize_json_report_and_inspect(tmp_path):
    out = tmp_path / "q"
    result = run(
        "quantize", "--bits", "8", "--method", "rtn", "-o", str(out), "--max-tokens", "2048", "--json", "--quiet"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1 and report["method"] == "rtn"
    assert report["perplexity_after"]["settings"]["dataset"] == "tinystories:eval"
    assert json.loads((out / "report.json").read_text())["size"] == report["size"]
    inspected = run("inspect", str(out), "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["bits"] == 8


def test_eval_any_checkpoint_needs_no_flags(tmp_path):
    result = run("eval", "--max-tokens", "1024", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["seq_len"] == 256 and data["settings"]["bos"] == "auto"
    assert data["settings"]["protocol"] == "stream"
    assert data["ci95"][0] < data["perplexity"] < data["ci95"][1]


def test_recipe_file_is_accepted(tmp_path):
    recipe = REPO / "configs" / "rtn-int4.yaml"
    result = run("quantize", "--config", str(recipe), "-o", str(tmp_path / "q"), "--no-eval", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["group_size"] == 32


def test_gptq_flags_reach_the_checkpoint(tmp_path):
    out = tmp_path / "q"
    result = run(
        "quantize",
        "--bits",
        "4",
        "--method",
        "gptq",
        "--no-clip-search",
        "--no-act-order",
        "--calib-samples",
        "4",
        "-o",
        str(out),
        "--no-eval",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    options = json.loads((out / "quantcli.json").read_text())["options"]
    assert options["clip_search"] is False and options["act_order"] is False
    assert json.loads(result.stdout)["options"] == options


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["quantize", "./no/such/model", "--bits", "4"], 2, "error: model folder ./no/such/model does not exist."),
        (["quantize", "nobody/no-such-model", "--bits", "4"], 3, "error: cannot load model 'nobody/no-such-model'"),
        (
            ["quantize", "--bits", "3", "--method", "bnb-nf4"],
            2,
            "error: method bnb-nf4 does not do 3-bit. It supports --bits 4.",
        ),
        (["quantize", "--bits", "5"], 2, "error: --bits 5 is not supported."),
        (
            ["quantize", "--bits", "4", "--method", "rtn", "--group-size", "48"],
            2,
            "error: group size 48 divides none of the selected layers' input widths (64, 172).",
        ),
        (
            ["quantize", "--bits", "4", "--method", "rtn", "--calib-dataset", "x", "--double-quant"],
            2,
            "error: option(s) double_quant do not apply to method rtn.",
        ),
        (
            ["quantize", "--bits", "4", "--method", "rtn", "--clip-search"],
            2,
            "error: option(s) clip_search do not apply to method rtn.",
        ),
        (["quantize", "--bits", "4", "--method", "nope"], 2, "error: unknown method 'nope'."),
        (
            ["quantize", "--bits", "4", "--skip-modules", "*.nothing"],
            2,
            "error: --skip-modules pattern '*.nothing' matches no layer.",
        ),
        (["eval", "--dataset", "EMPTY"], 3, "error: dataset EMPTY holds no text."),
        (["inspect", "."], 3, "error: . has no quantcli.json"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code(tmp_path, args, code, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    message = message.replace("EMPTY", str(empty))
    before = set(Path.cwd().iterdir())
    result = run(*args, "--quiet") if args[0] != "inspect" else run(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert set(Path.cwd().iterdir()) == before


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("quantize", "--bits", "8", "-o", str(out), "--quiet", "--no-eval")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"error: output folder {out} already exists. Pass --force to replace it, or choose another --output."
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    forced = run("quantize", "--bits", "8", "-o", str(out), "--quiet", "--no-eval", "--force")
    assert (
        forced.exit_code == 2 and "was not written by quantcli" in forced.stderr
    )  # --force replaces only quantcli's own folders
    (out / "keep.txt").unlink()
    forced = run("quantize", "--bits", "8", "-o", str(out), "--quiet", "--no-eval", "--force")
    assert forced.exit_code == 0 and (out / "quantcli.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys, quantcli, quantcli.cli.app;"
        " assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run([sys.executable, "-m", "quantcli", "--help"], capture_output=True, text=True, check=True)
    assert "quantize" in result.stdout and "eval" in result.stdout


def test_every_method_is_registered_whatever_was_imported_first():
    code = (
        "import quantcli.methods.bnb; from quantcli.methods import available_methods;"
        "print(' '.join(m.name for m in available_methods()))"
    )
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"bnb-int8", "bnb-nf4", "bnb-fp4", "rtn", "cast"} <= set(names)
