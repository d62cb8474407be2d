"""NaN and inf never reach a checkpoint or stdout: weights too large for a finite scale are refused
before quantizing (in memory and --low-memory), a model with non-finite logits has no perplexity,
a float16 cast overflow is named as such, and every --json output is strict JSON."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.support.badfiles import copy_model, edit_weights, quantized_checkpoint

LAYER = "model.layers.1.self_attn.q_proj"


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def _huge(folder, value):
    def edit(state):
        state[f"{LAYER}.weight"][0, 3] = value
        state[f"{LAYER}.weight"][0, 4] = -value

    return edit_weights(copy_model(folder), edit)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("huge")
    _huge(root / "huge", 3e38)
    _huge(root / "big16", 1e5)
    return root


def _run(argv):
    return CliRunner().invoke(app, argv)


@pytest.mark.parametrize(
    "extra",
    [
        ["-m", "rtn", "--max-tokens", "256"],
        ["-m", "rtn", "--asymmetric", "--no-eval"],
        ["--low-memory"],
        ["-m", "gptq", "--calib-samples", "2", "--no-eval"],
    ],
)
def test_weights_too_large_for_a_finite_scale_are_refused(models, tmp_path, extra):
    result = _run(["quantize", str(models / "huge"), "-b", "4", *extra, "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 3, result.output
    assert f"layer {LAYER} has weights up to 3e+38 in magnitude; its quantization scale would overflow" in result.stderr
    assert f"--skip-modules '{LAYER}'" in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_skipping_the_huge_layer_writes_a_finite_checkpoint(models, tmp_path):
    result = _run(
        [
            "quantize",
            str(models / "huge"),
            "-b",
            "4",
            "-m",
            "rtn",
            "--no-eval",
            "--skip-modules",
            LAYER,
            "-o",
            str(tmp_path / "out"),
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    assert LAYER in _strict(result.stdout)["skipped"]


def test_a_model_with_non_finite_logits_has_no_perplexity(models):
    result = _run(["eval", str(models / "huge"), "--max-tokens", "256", "--json"])
    assert result.exit_code == 3 and result.stdout == ""
    assert "gives non-finite logits (NaN/inf) on the evaluation text, so it has no perplexity" in result.stderr


def test_a_float16_overflow_is_named_not_blamed_on_the_download(models, tmp_path):
    result = _run(
        ["quantize", str(models / "big16"), "-b", "16", "--dtype", "float16", "--no-eval", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 3
    assert (
        f"weight {LAYER}.weight is stored as F32 and 2 of its values overflow float16 (inf after the cast). Use "
        "--dtype float32 or bfloat16." in result.stderr
    )
    assert "re-download" not in result.stderr


def test_json_output_is_strict_even_when_a_report_holds_nan(tmp_path):
    folder = quantized_checkpoint(tmp_path / "ckpt")
    report = json.loads((folder / "report.json").read_text())
    report["perplexity_after"] = {"perplexity": float("nan")}
    report["perplexity_before"] = {"perplexity": float("inf")}
    (folder / "report.json").write_text(json.dumps(report))
    result = _run(["compare", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    row = _strict(result.stdout)["rows"][0]
    assert row["perplexity"] is None and row["base_perplexity"] is None


def test_written_json_is_strict(tmp_path):
    from quantcli.strict_json import write_json

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("-inf"), 1.5]})
    assert _strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5]}
