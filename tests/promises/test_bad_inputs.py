"""Every bad input, across every command, ends in one ``error:`` line, the documented exit code, and
nothing written. Click's own usage errors (a non-integer ``--bits``, an unknown option) keep click's
standard usage block and exit 2; they are checked separately."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.support.badfiles import (
    big_tokenizer_model,
    edit_json,
    nan_model,
    quantized_checkpoint,
    remote_code_model,
    truncate,
)
from tests.support.models import REPO

RECIPES = {
    "bad.yaml": "bits: 4\nmethod: [rtn\n",
    "list.yaml": "- bits: 4\n",
    "empty.yaml": "# nothing\n",
    "section.yaml": "bits: 4\ncalibration:\n  samples: 8\n  windows: 2\n",
    "option.yaml": "bits: 4\nmethod: rtn\nblock_size: 128\n",
    "bits.yaml": "bits: four\n",
    "eval.yaml": "bits: 4\neval: 3\n",
    "binary.yaml": "\udcff",
    "bomb.yaml": "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    + "bits: *i\n",
    "dup.yaml": "bits: 4\nmethod: rtn\nbits: 8\n",
    "pyobj.yaml": "bits: !!python/object/apply:os.system ['touch ran']\n",
    "tag.yaml": "bits: !custom 4\n",
    "huge-value.yaml": "bits: " + "9" * 200_000 + "x\n",
    "bigint.yaml": "bits: " + "9" * 5000 + "\n",
    "deep.yaml": "bits: " + "[" * 5000 + "]" * 5000 + "\n",
    "huge.yaml": "bits: 4\n" + "# padding\n" * 120_000,
}

METADATA = {
    "meta-no-method": lambda d: {k: v for k, v in d.items() if k != "method"},
    "meta-bits": lambda d: {**d, "bits": "4"},
    "meta-layers": lambda d: {**d, "layers": [1, 2]},
    "meta-options": lambda d: {**d, "options": "fast"},
    "meta-array": lambda d: [d],
}

Q = ["quantize", "-o", "out", "--no-eval"]
E = ["eval", "ckpt", "--max-tokens", "512"]
ROWS = [
    # (id, argv, exit code, text the error line must contain)
    ("bits-5", [*Q, "--bits", "5"], 2, "--bits 5 is not supported"),
    ("no-bits", ["quantize", "-o", "out"], 2, "no --bits given"),
    ("unknown-method", [*Q, "-b", "4", "-m", "squeezellm"], 2, "unknown method 'squeezellm'"),
    ("method-bits", [*Q, "-b", "16", "-m", "rtn"], 2, "does not do 16-bit"),
    ("group-size-0", [*Q, "-b", "4", "-g", "0"], 2, "group size must be a positive integer"),
    ("group-size-7", [*Q, "-b", "4", "-g", "7"], 2, "divides none of the selected layers"),
    ("skip-nothing", [*Q, "-b", "4", "--skip-modules", "decoder.*"], 2, "matches no layer"),
    ("device", [*Q, "-b", "4", "--device", "tpu"], 2, "--device must be"),
    ("cuda", [*Q, "-b", "4", "--device", "cuda"], 5, "torch sees no GPU"),
    ("dtype", [*Q, "-b", "4", "--dtype", "float64"], 2, "--dtype must be"),
    ("shard-size", [*Q, "-b", "4", "--max-shard-size", "12XB"], 2, "--max-shard-size must be a size"),
    ("seq-len-0", [*Q, "-b", "4", "--seq-len", "0"], 2, "must be a positive integer"),
    ("missing-model", [*Q, "-b", "4", "./missing"], 2, "does not exist"),
    ("model-is-file", [*Q, "-b", "4", "short.txt"], 2, "is a file, not a model folder"),
    ("hub-offline", [*Q, "-b", "4", "nobody/nothing"], 3, "HF_HUB_OFFLINE is set"),
    ("remote-code", [*Q, "-b", "4", "remote"], 3, "pass --trust-remote-code"),
    ("nan-weights", [*Q, "-b", "4", "nan"], 3, "model.layers.1.self_attn.q_proj.weight holds 1 NaN/inf"),
    ("big-tokenizer", [*Q, "-b", "4", "bigtok"], 3, "520 tokens but the model's embedding has 512 rows"),
    ("output-exists", ["quantize", "-b", "4", "--no-eval", "-o", "ckpt"], 2, "already exists. Pass --force"),
    (
        "output-is-input",
        ["quantize", "-b", "4", "--no-eval", "nan", "-o", "nan", "--force"],
        2,
        "is the input model's folder",
    ),
    ("output-is-file", ["quantize", "-b", "4", "--no-eval", "-o", "short.txt", "--force"], 2, "is not a folder"),
    (
        "eval-short",
        ["quantize", "-b", "4", "-o", "out", "--eval-dataset", "short.txt", "--seq-len", "64"],
        3,
        "fewer than one window",
    ),
    ("eval-empty", ["quantize", "-b", "4", "-o", "out", "--eval-dataset", "empty.txt"], 3, "holds no text"),
    (
        "eval-binary",
        ["quantize", "-b", "4", "-o", "out", "--eval-dataset", "data.xyz"],
        2,
        "data.xyz is not UTF-8 text: invalid byte at offset 3. Convert it to UTF-8.",
    ),
    (
        "calib-column",
        ["quantize", "-b", "4", "-o", "out", "--method", "gptq", "--no-eval", "--calib-dataset", "rows.jsonl"],
        2,
        "dataset rows.jsonl has no 'text' column (columns: story). Name the column with --text-column.",
    ),
    ("eval-missing", ["quantize", "-b", "4", "-o", "out", "--eval-dataset", "./none.txt"], 2, "does not exist"),
    ("eval-spec", ["quantize", "-b", "4", "-o", "out", "--eval-dataset", "a:b:c:d"], 2, "is not of the form"),
    (
        "eval-split",
        ["quantize", "-b", "4", "-o", "out", "--eval-dataset", "tinystories:test"],
        2,
        "has splits calib, eval",
    ),
    ("recipe-missing", [*Q, "-c", "none.yaml"], 2, "does not exist"),
    ("recipe-syntax", [*Q, "-c", "bad.yaml"], 2, "is not valid YAML at line"),
    ("recipe-list", [*Q, "-c", "list.yaml"], 2, "must be a YAML mapping"),
    ("recipe-empty", [*Q, "-c", "empty.yaml"], 2, "is empty"),
    ("recipe-section", [*Q, "-c", "section.yaml"], 2, "unknown key(s) windows in 'calibration'"),
    ("recipe-option", [*Q, "-c", "option.yaml"], 2, "do not apply to method rtn"),
    ("recipe-bits", [*Q, "-c", "bits.yaml"], 2, "'bits' must be an integer"),
    ("recipe-eval", ["quantize", "-o", "out", "-c", "eval.yaml"], 2, "'eval' must be a mapping"),
    ("recipe-binary", [*Q, "-c", "binary.yaml"], 2, "cannot read recipe"),
    ("recipe-alias-bomb", [*Q, "-c", "bomb.yaml"], 2, "uses a YAML alias (*a) at line 2"),
    ("recipe-duplicate", [*Q, "-c", "dup.yaml"], 2, "sets 'bits' twice at line 3"),
    ("recipe-python-tag", [*Q, "-c", "pyobj.yaml"], 2, "uses the YAML tag !!python/object/apply:os.system at line 1"),
    ("recipe-custom-tag", [*Q, "-c", "tag.yaml"], 2, "uses the YAML tag !custom"),
    ("recipe-huge-value", [*Q, "-c", "huge-value.yaml"], 2, "'bits' must be an integer, got '99999"),
    (
        "recipe-bigint",
        [*Q, "-c", "bigint.yaml"],
        2,
        "holds a value quantcli cannot read (Exceeds the limit (4300 digits)",
    ),
    ("recipe-deep", [*Q, "-c", "deep.yaml"], 2, "nests too deeply"),
    ("recipe-huge-file", [*Q, "-c", "huge.yaml"], 2, "is larger than 1,048,576 bytes"),
    ("recipe-dev-zero", [*Q, "-c", "/dev/zero"], 2, "recipe /dev/zero is not a regular file"),
    ("recipe-folder", [*Q, "-c", "."], 2, "recipe . is a folder"),
    (
        "calib-samples-huge",
        [*Q, "-b", "4", "-m", "gptq", "--calib-samples", str(10**9)],
        2,
        "--calib-samples) must be an integer from 1 to 100,000, got 1000000000",
    ),
    (
        "calib-tokens-huge",
        [*Q, "-b", "4", "-m", "gptq", "--calib-samples", "100000", "--seq-len", "4096"],
        2,
        "is 409,600,000 calibration tokens",
    ),
    (
        "seed-huge",
        [*Q, "-b", "4", "-m", "gptq", "--seed", str(10**23)],
        2,
        "(--seed) must be an integer from 0 to 4,294,967,295",
    ),
    ("seed-negative", [*Q, "-b", "4", "-m", "gptq", "--seed", "-1"], 2, "(--seed) must be an integer from 0"),
    (
        "seq-len-huge",
        [*Q, "-b", "4", "--seq-len", str(10**12)],
        2,
        "(--seq-len) must be an integer from 1 to 1,048,576",
    ),
    ("max-tokens-huge", [*E, "--max-tokens", str(10**30)], 2, "(--max-tokens) must be an integer from 1 to"),
    ("batch-huge", [*E, "--batch-size", str(10**9)], 2, "(--batch-size) must be an integer from 1 to 4,096"),
    (
        "bench-new-tokens-huge",
        ["bench", "ckpt", "--new-tokens", str(10**9)],
        2,
        "--new-tokens must be an integer from 1 to 65,536",
    ),
    (
        "bench-repeats-huge",
        ["bench", "ckpt", "--repeats", str(10**9)],
        2,
        "--repeats must be an integer from 1 to 1,000",
    ),
    (
        "bench-prompt-huge",
        ["bench", "ckpt", "--prompt-tokens", str(10**20)],
        2,
        "--prompt-tokens must be an integer from 1 to 1,048,576",
    ),
    (
        "gate-nan",
        [*Q, "-b", "4", "-m", "rtn", "--max-ppl-increase", "nan"],
        2,
        "--max-ppl-increase must be a finite, non-negative number, got nan",
    ),
    ("gate-inf", [*Q, "-b", "4", "--max-size", "inf"], 2, "--max-size must be a finite, non-negative number, got inf"),
    (
        "bench-gate-nan",
        ["bench", "ckpt", "--min-speedup", "nan"],
        2,
        "--min-speedup must be a finite, non-negative number, got nan",
    ),
    ("shard-size-overflow", [*Q, "-b", "4", "--max-shard-size", "1" + "0" * 400], 2, "--max-shard-size must be a size"),
    ("calib-folder", [*Q, "-b", "4", "-m", "gptq", "--calib-dataset", "."], 2, "dataset . is a folder, not a file"),
    (
        "calib-dev-zero",
        [*Q, "-b", "4", "-m", "gptq", "--calib-dataset", "/dev/zero"],
        2,
        "dataset /dev/zero is not a regular file",
    ),
    ("eval-dataset-folder", [*E, "--dataset", "/tmp"], 2, "dataset /tmp is a folder, not a file"),
    ("eval-truncated", ["eval", "trunc"], 3, "corrupt or incomplete"),
    ("eval-newer", ["eval", "newer"], 3, "newer than this quantcli reads"),
    ("eval-missing-model", ["eval", "./gone"], 2, "does not exist"),
    ("eval-stride", [*E, "--stride", "500"], 2, "stride 500 is larger than the context length 256"),
    ("eval-bos", [*E, "--bos", "sometimes"], 2, "bos must be one of"),
    ("eval-bos-document", [*E, "--bos", "document"], 2, "--bos document is now --protocol documents --bos start"),
    (
        "eval-protocol",
        [*E, "--protocol", "documents"],
        2,
        "--protocol documents needs documents, and tinystories:eval is plain text",
    ),
    (
        "eval-seq-len-1",
        [*E, "--seq-len", "1"],
        2,
        "eval sequence length (--seq-len) must be at least 2 (a window predicts each token from the ones before it), "
        "got 1.",
    ),
    (
        "eval-context",
        [*E, "--seq-len", "4096"],
        2,
        "--seq-len 4096 is beyond the model's context of 512 tokens (max_position_embeddings). Use --seq-len 512 or "
        "less.",
    ),
    ("eval-data-first", ["eval", "./gone", "--dataset", "data.xyz"], 2, "data.xyz is not UTF-8 text"),
    (
        "eval-column",
        [*E, "--dataset", "rows.jsonl", "--text-column", "body"],
        2,
        "dataset rows.jsonl has no column 'body' (columns: story). Pass one of them to --text-column.",
    ),
    ("eval-max-tokens", [*E, "--max-tokens", "0"], 2, "max tokens (--max-tokens) must be a positive integer"),
    ("eval-batch", [*E, "--batch-size", "0"], 2, "batch size (--batch-size) must be a positive integer"),
    ("eval-bigtok", ["eval", "bigtok"], 3, "do not belong together"),
    ("eval-short-text", [*E, "--dataset", "short.txt", "--seq-len", "64"], 3, "fewer than one window of --seq-len 64"),
    ("eval-base-missing", [*E, "--base", "./gone"], 2, "does not exist"),
    ("eval-remote", ["eval", "remote"], 3, "--trust-remote-code"),
    ("inspect-missing", ["inspect", "gone"], 2, "is not a folder"),
    ("inspect-plain", ["inspect", "nan"], 3, "has no quantcli.json"),
    ("inspect-newer", ["inspect", "newer"], 3, "newer than this quantcli reads"),
    ("inspect-corrupt", ["inspect", "corrupt"], 3, "is corrupt"),
    ("inspect-no-method", ["inspect", "meta-no-method"], 3, "quantcli.json is malformed: 'method' must be a string"),
    ("inspect-bits-type", ["inspect", "meta-bits"], 3, "quantcli.json is malformed: 'bits' must be an integer"),
    ("inspect-layers-list", ["inspect", "meta-layers"], 3, "quantcli.json is malformed: 'layers' must map layer names"),
    ("inspect-options-type", ["inspect", "meta-options"], 3, "quantcli.json is malformed: 'options' must be a mapping"),
    ("inspect-array", ["inspect", "meta-array"], 3, "has no valid format_version"),
    ("inspect-dev-zero", ["inspect", "meta-devzero"], 3, "quantcli.json is not a regular file"),
    (
        "compare-deep-report",
        ["compare", "report-deep"],
        3,
        "report-deep/report.json is corrupt (maximum recursion depth",
    ),
    ("eval-malformed-meta", ["eval", "meta-layers"], 3, "quantcli.json is malformed"),
    (
        "plot-proc",
        ["compare", "ckpt", "--plot", "/proc/quantcli.png"],
        2,
        "cannot write --plot /proc/quantcli.png: creating a file in /proc failed",
    ),
    ("plot-under-file", ["compare", "ckpt", "--plot", "short.txt/plot.png"], 2, "short.txt is a file, not a folder"),
    ("plot-not-png", ["compare", "ckpt", "--plot", "plot.pdf"], 2, "--plot plot.pdf: write a .png file"),
    (
        "output-proc",
        ["quantize", "--no-eval", "-b", "4", "-o", "/proc/quantcli-out"],
        2,
        "cannot write --output /proc/quantcli-out: creating a file in /proc failed",
    ),
    (
        "eval-bad-jsonl",
        [*E, "--dataset", "bad.jsonl"],
        3,
        "cannot read dataset bad.jsonl: ArrowInvalid: JSON parse error",
    ),
    (
        "eval-bad-csv",
        [*E, "--dataset", "bad.csv"],
        3,
        "cannot read dataset bad.csv: ParserError: Error tokenizing data",
    ),
    (
        "calib-dir-named",
        [*Q, "-b", "4", "-m", "gptq", "--calib-dataset", "ckpt"],
        2,
        "dataset ckpt is a folder, not a file",
    ),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    ckpt = quantized_checkpoint(root / "ckpt")
    for name, edit in (("trunc", None), ("newer", {"format_version": 2}), ("corrupt", None)):
        shutil.copytree(ckpt, root / name)
        if edit:
            edit_json(root / name / "quantcli.json", **edit)
    truncate(root / "trunc" / "model.safetensors")
    shutil.copytree(ckpt, root / "meta-devzero")
    (root / "meta-devzero" / "quantcli.json").unlink()
    (root / "meta-devzero" / "quantcli.json").symlink_to("/dev/zero")
    shutil.copytree(ckpt, root / "report-deep")
    (root / "report-deep" / "report.json").write_text("[" * 100_000)
    for name, change in METADATA.items():
        shutil.copytree(ckpt, root / name)
        data = json.loads((root / name / "quantcli.json").read_text())
        (root / name / "quantcli.json").write_text(json.dumps(change(data)))
    (root / "corrupt" / "quantcli.json").write_text('{"format_version": 1,')
    remote_code_model(root / "remote", root / "ran")
    nan_model(root / "nan")
    big_tokenizer_model(root / "bigtok")
    (root / "short.txt").write_text("Once upon a time there was a cat.")
    (root / "empty.txt").write_text("\n\n   \n")
    (root / "data.xyz").write_bytes(b"abc\xff\xfe")
    (root / "rows.jsonl").write_text('{"story": "Once upon a time there was a cat."}\n')
    (root / "bad.jsonl").write_text('{"text": "a b c"}\n{bad json\n')
    (root / "bad.csv").write_text('text,b\n1,2,3,4\n"x\n')
    for name, text in RECIPES.items():
        (root / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    return root


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.fixture
def in_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    yield workspace
    assert _snapshot(workspace) == before, "a failing run wrote or changed files"
    assert not (workspace / "ran").exists()


@pytest.mark.parametrize("argv, code, text", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_gives_one_error_line(in_workspace, argv, code, text):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "argv, option",
    [
        (["quantize", "--bits", "x"], "--bits"),
        (["eval", "--seq-len", "abc"], "--seq-len"),
        (["inspect"], "Missing argument"),
        (["quantize", "--bogus"], "--bogus"),
    ],
)
def test_click_usage_errors_keep_clicks_format(in_workspace, argv, option):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: ") and "Error: " in result.stderr and option in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, code",
    [
        (["quantize", "-b", "5", "-o", "out"], 2),
        (["eval", "newer"], 3),
        (["eval", "--dataset", "bad.jsonl"], 3),
        (["eval", "--dataset", "bad.csv"], 3),
    ],
)
def test_bad_input_in_a_real_process(in_workspace, argv, code):
    env = {**os.environ, "PYTHONPATH": str(REPO), "QUANTCLI_DEBUG": ""}
    result = subprocess.run([sys.executable, "-m", "quantcli", *argv], env=env, capture_output=True, text=True)
    assert result.returncode == code
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
