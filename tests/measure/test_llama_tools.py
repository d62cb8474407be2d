"""llama.cpp's command-line tools from `make llama-tools` (.llamacpp-tools/bin), the anchors of
benchmarks/anchors.py: llama-imatrix collects an importance matrix on a tiny GGUF (stories260K written by the
gguf package), llama-quantize writes Q4_0 with and without it, and the matrix steers the rounding: the
imatrix-weighted error of the weights is lower with it. Skips unless the tools are built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support.gguf_files import write_llama_gguf
from tests.support.gguf_harness import REPO, eval_text

TOOLS = REPO / ".llamacpp-tools" / "bin"


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.is_file():
        pytest.skip(f"{path} is missing. Run `make llama-tools`.")
    return str(path)


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def files(stories_path, tmp_path_factory):
    quantize, imatrix = tool("llama-quantize"), tool("llama-imatrix")
    folder = tmp_path_factory.mktemp("llama-tools")
    f32 = write_llama_gguf(stories_path, folder / "F32.gguf")
    text = folder / "calib.txt"
    text.write_text(eval_text("tinystories:calib")[:40000])
    matrix = folder / "imatrix.gguf"
    run(imatrix, "-m", str(f32), "-f", str(text), "-o", str(matrix), "-c", "128", "--chunks", "4", "-t", "1")
    plain, weighted = folder / "Q4_0.gguf", folder / "Q4_0-imatrix.gguf"
    run(quantize, str(f32), str(plain), "Q4_0", "1")
    run(quantize, "--imatrix", str(matrix), str(f32), str(weighted), "Q4_0", "1")
    return f32, matrix, plain, weighted


def tensors(path: Path) -> dict:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type)) for t in GGUFReader(str(path)).tensors}


def importance(path: Path) -> dict[str, np.ndarray]:
    """Per input column, the mean squared activation llama-imatrix collected (``in_sum2 / counts``)."""
    from gguf import GGUFReader

    found = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in GGUFReader(str(path)).tensors}
    return {
        name[: -len(".in_sum2")]: found[name] / found[name[: -len(".in_sum2")] + ".counts"][0]
        for name in found
        if name.endswith(".in_sum2")
    }


def test_imatrix_covers_every_linear_weight(files):
    f32, matrix, _, _ = files
    weights = {name for name, (_, w) in tensors(f32).items() if w.ndim == 2 and name != "token_embd.weight"}
    assert set(importance(matrix)) == weights  # tied head: token_embd only


def test_quantize_writes_q4_0_and_the_imatrix_lowers_its_weighted_error(files):
    f32, matrix, plain, weighted = files
    exact, ours, theirs = tensors(f32), tensors(plain), tensors(weighted)
    errors = {"plain": 0.0, "imatrix": 0.0}
    quantized = 0
    for name, columns in importance(matrix).items():
        if ours[name][0] != "Q4_0":
            continue
        quantized += 1
        assert theirs[name][0] == "Q4_0"
        for label, found in (("plain", ours), ("imatrix", theirs)):
            diff = (found[name][1].astype(np.float64) - exact[name][1]).reshape(-1, columns.size)
            errors[label] += float((diff**2 * columns).sum())
    assert quantized == 6 * 5  # q, k, v, o, gate, up of 5 blocks (down is 172 wide: no Q4_0 blocks of 32)
    assert errors["imatrix"] < errors["plain"]
