"""GGUF input: `quantcli eval/quantize FILE.gguf` and quantcli.load read llama.cpp files through
transformers' loader (dequantized) and report the source type. The files are stories260K written
with the gguf package's writer (tests/support/gguf_files.py), so CI makes them without llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from quantcli.checkpoint.load import load
from quantcli.config.quantize import EvalConfig
from quantcli.measure.evaluation import evaluate
from tests.support.gguf_files import write_llama_gguf

CLI = [sys.executable, "-m", "quantcli"]


@pytest.fixture(scope="module")
def f32_gguf(stories_path, tmp_path_factory) -> Path:
    return write_llama_gguf(stories_path, tmp_path_factory.mktemp("gguf") / "stories260K.F32.gguf", "F32")


@pytest.fixture(scope="module")
def q8_gguf(stories_path, tmp_path_factory) -> Path:
    return write_llama_gguf(stories_path, tmp_path_factory.mktemp("gguf") / "stories260K.Q8_0.gguf", "Q8_0")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_load_gives_the_same_weights_and_tokens(f32_gguf, stories_path):
    model, tokenizer, metadata = load(f32_gguf, "cpu")
    reference, reference_tokenizer, _ = load(stories_path, "cpu")
    assert metadata is None
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(tensor, reference.state_dict()[name]) for name, tensor in model.state_dict().items())
    text = Path(stories_path, "README.md").read_text(encoding="utf-8")
    assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids


def test_eval_gguf_equals_the_folder_and_names_the_source(f32_gguf, stories_path):
    from_gguf = run("eval", str(f32_gguf), "--max-tokens", "2048", "--json", "-q")
    assert from_gguf.returncode == 0, from_gguf.stderr
    gguf_result, folder_result = (
        json.loads(from_gguf.stdout),
        evaluate(stories_path, EvalConfig(max_tokens=2048), device="cpu"),
    )
    assert gguf_result["perplexity"] == pytest.approx(folder_result["perplexity"], rel=1e-6)
    assert gguf_result["source_format"] == {"format": "gguf", "file_type": "ALL_F32", "tensor_types": {"F32": 47}}
    assert gguf_result["disk_bytes"] == f32_gguf.stat().st_size
    assert folder_result["source_format"] is None


def test_quantize_q8_gguf_reports_its_type(q8_gguf, stories_path, tmp_path):
    result = run(
        "quantize",
        str(q8_gguf),
        "-b",
        "4",
        "--method",
        "rtn",
        "--max-tokens",
        "1024",
        "-o",
        str(tmp_path / "out"),
        "--json",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["size"]["original_format"] == {
        "format": "gguf",
        "file_type": "MOSTLY_Q8_0",
        "tensor_types": {"Q8_0": 31, "F32": 16},
    }
    assert report["size"]["original_disk_bytes"] == q8_gguf.stat().st_size
    folder = evaluate(stories_path, EvalConfig(max_tokens=1024), device="cpu")
    assert report["perplexity_before"]["perplexity"] == pytest.approx(folder["perplexity"], rel=0.01)  # Q8_0 costs <1%
    assert report["perplexity_before"]["perplexity"] != folder["perplexity"]
    model, _, metadata = load(tmp_path / "out", "cpu")
    assert metadata["method"] == "rtn" and metadata["source_model"] == str(q8_gguf)


def test_bnb_from_gguf(q8_gguf, tmp_path):
    result = run(
        "quantize",
        str(q8_gguf),
        "--method",
        "bnb-int8",
        "-b",
        "8",
        "--no-eval",
        "-o",
        str(tmp_path / "out"),
        "--json",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "bitsandbytes"


def test_missing_gguf_package_is_one_line_exit_5(f32_gguf):
    blocked = (
        "import sys; sys.modules['gguf'] = None; from quantcli.cli.app import main; sys.argv[0] = 'quantcli'; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, "eval", str(f32_gguf), "-q"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 5
    assert result.stderr.strip().splitlines() == [
        f"error: reading {f32_gguf} needs the gguf package (llama.cpp's reader), which is not installed."
        " Run: pip install 'quantcli[gguf]'"
    ]


def test_truncated_gguf_is_a_load_error(f32_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(f32_gguf.read_bytes()[:5000])
    for command in (
        ["eval", str(broken), "-q"],
        ["quantize", str(broken), "-b", "4", "-o", str(tmp_path / "out"), "-q"],
    ):
        result = run(*command)
        assert result.returncode == 3, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(broken) in result.stderr


def test_sequential_refuses_gguf_with_the_fix(q8_gguf, tmp_path):
    result = run("quantize", str(q8_gguf), "-b", "4", "--low-memory", "-o", str(tmp_path / "out"), "-q")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --low-memory streams safetensors weights, and {q8_gguf} is a GGUF file, which is read whole. Drop "
        "--low-memory."
    )
