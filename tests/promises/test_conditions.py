"""Documented conditions are not internal errors (issue 25, class 8): each ends in its own one-line message
and exit code, checked in real processes where the condition is the process's own (stdout, file size
limits, memory)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.support.badfiles import copy_model, edit_json, quantized_checkpoint
from tests.support.hostile import ROOT, cli

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STDOUT = "error: cannot write the result to stdout: {why} (a closed pipe or a full disk)."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


def test_a_gguf_past_the_file_size_limit_is_exit_2_and_nothing_written(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    argv = [
        sys.executable,
        "-m",
        "quantcli",
        "quantize",
        "-b",
        "8",
        "--format",
        "gguf",
        "--gguf-type",
        "Q8_0",
        "--no-eval",
        "-o",
        "g8",
        "-q",
    ]
    done = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        "error: the disk is full (or the file size limit was hit) while"
        " writing g8; nothing was written. Free space or choose another --output.\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_on_stdout_is_one_line_exit_2(checkpoint, tmp_path):
    reader, writer = os.pipe()
    os.close(reader)  # closed before quantcli writes: every write is EPIPE
    done = subprocess.run(
        [sys.executable, "-m", "quantcli", "inspect", str(checkpoint)],
        env=ENV,
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(writer)
    assert (done.returncode, done.stderr) == (2, STDOUT.format(why="Broken pipe") + "\n")


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_stdout_on_a_full_disk_is_one_line_exit_2(checkpoint, json_flag):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "quantcli", "inspect", str(checkpoint), *json_flag],
            env=ENV,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert (
        done.stderr.startswith("error: cannot write the result to stdout: ")
        and "(a closed pipe or a full disk)." in done.stderr
    )


def test_an_output_name_near_the_file_name_limit_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "x" * 240
    result = CliRunner().invoke(app, ["quantize", "-b", "4", "--no-eval", "-o", name])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: output name '{'x' * 27}...{'x' * 28}' is 240 bytes; quantcli writes it as .NAME.partial-PID first,"
        " which must fit"
        " the file system's 255-byte limit. Use an --output name of at most 238 bytes.\n"
    )
    assert list(tmp_path.iterdir()) == []


def bitsandbytes_labelled(folder):
    model = copy_model(folder)
    edit_json(model / "config.json", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    return model


@pytest.mark.parametrize(
    "make, label",
    [
        (lambda tmp, ckpt: shutil.copytree(ckpt, tmp / "model"), "'compressed-tensors', written by quantcli"),
        (lambda tmp, ckpt: bitsandbytes_labelled(tmp / "model"), "'bitsandbytes', written by another tool"),
    ],
    ids=["quantcli", "bitsandbytes"],
)
def test_requantizing_a_quantized_checkpoint_is_refused(checkpoint, tmp_path, make, label):
    model = make(tmp_path, checkpoint)
    code, out, err = cli(["quantize", model, "-b", "4", "--no-eval", "-o", "out"], tmp_path)
    assert (code, out, err) == (
        2,
        "",
        [
            f"error: {model} is already quantized ({label}); quantizing its codes again would only lose more."
            " Quantize the original full-precision model (quantcli inspect names it) instead."
        ],
    )
    assert not (tmp_path / "out").exists()


def test_bench_past_the_position_table_is_refused_as_eval_refuses_it():
    result = CliRunner().invoke(app, ["bench", "--prompt-tokens", "500", "--new-tokens", "100", "--repeats", "1"])
    assert (result.exit_code, result.stdout, result.stderr) == (
        2,
        "",
        (
            "error: --prompt-tokens 500 plus --new-tokens 100 is 600 positions, beyond the model's context of 512"
            " tokens"
            " (max_position_embeddings). Use at most 512 in all.\n"
        ),
    )


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda report: report["size"].update(parameters="many"), "size.parameters is 'many', not an integer"),
        (lambda report: report.update(perplexity_after=[1, 2]), "perplexity_after is [1, 2], not an object"),
        (
            lambda report: report["perplexity_after"].update(perplexity="low"),
            "perplexity_after.perplexity is 'low', not a number",
        ),
    ],
    ids=["parameters", "section", "perplexity"],
)
def test_compare_refuses_a_report_field_of_the_wrong_type(checkpoint, tmp_path, edit, field):
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    report = json.loads((folder / "report.json").read_text())
    report["perplexity_after"] = report.get("perplexity_after") or {"perplexity": 10.0}
    edit(report)
    (folder / "report.json").write_text(json.dumps(report))
    result = CliRunner().invoke(app, ["compare", str(folder)])
    assert (result.exit_code, result.stdout) == (3, "")
    assert (
        result.stderr.startswith(f"error: {folder / 'report.json'}: field {field}. The file is damaged")
        and result.stderr.count("\n") == 1
    )


@pytest.mark.slow
def test_out_of_memory_is_one_line_exit_5(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))

    argv = [
        sys.executable,
        "-m",
        "quantcli",
        "quantize",
        "-m",
        "gptq",
        "-b",
        "4",
        "--calib-samples",
        "100000",
        "--seq-len",
        "256",
        "--no-eval",
        "-o",
        "oom",
        "-q",
    ]
    done = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 5 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: out of memory (") and done.stderr.endswith(
        "Use --low-memory (quantize), a smaller --batch-size, --calib-samples or --max-tokens, or a machine with more"
        " memory.\n"
    )
    assert list(tmp_path.iterdir()) == []
