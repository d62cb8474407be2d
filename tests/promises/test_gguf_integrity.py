"""GGUF input has the safetensors integrity promise (issue 25, class 2) and is read with bounds (class 3):
a missing or extra tensor, a block_count off by one, another architecture's label, or a header whose counts
cannot fit the file are refused in one line (exit 3) before any evaluation, bench or quantization."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("gguf")

from quantcli.cli.app import app
from tests.support.gguf_files import write_llama_gguf
from tests.support.hostile import cli, copy_gguf

END = "The file is incomplete or its metadata is wrong: convert the model again."


@pytest.fixture(scope="module")
def files(stories_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    good = write_llama_gguf(stories_path, folder / "good.gguf", "Q8_0")
    blocks = lambda n: {"llama.block_count": n}  # noqa: E731
    made = {
        "missing": copy_gguf(good, folder / "missing.gguf", drop={"blk.1.attn_q.weight"}),
        "extra": copy_gguf(
            good, folder / "extra.gguf", extra=[("blk.0.ffn_gate_inp.weight", np.zeros((8, 64), np.float32))]
        ),
        "fewer-blocks": copy_gguf(good, folder / "fewer-blocks.gguf", metadata=blocks(4)),
        "more-blocks": copy_gguf(good, folder / "more-blocks.gguf", metadata=blocks(6)),
        "huge-blocks": copy_gguf(good, folder / "huge-blocks.gguf", metadata=blocks(100_000)),
        "stray-block": copy_gguf(
            good, folder / "stray-block.gguf", extra=[("blk.9.attn_q.weight", np.zeros((64, 64), np.float32))]
        ),
        "other-arch": copy_gguf(good, folder / "other-arch.gguf", arch="qwen2"),
    }
    import gguf

    fields = gguf.GGUFReader(good).fields.items()
    renamed = {
        name: (name.replace("llama.", "qwen2."), field.contents())
        for name, field in fields
        if name.startswith("llama.")
    }
    made["relabelled"] = copy_gguf(good, folder / "relabelled.gguf", arch="qwen2", metadata=renamed)
    data = bytearray(good.read_bytes())
    key = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
    data[key + 8 : key + 16] = struct.pack("<Q", 1 << 60)  # after the value type and item type: the item count
    (folder / "long-array.gguf").write_bytes(data)
    data = bytearray(good.read_bytes())
    data[8:16] = struct.pack("<Q", 1 << 62)  # the tensor count
    (folder / "tensor-count.gguf").write_bytes(data)
    made["long-array"], made["tensor-count"] = folder / "long-array.gguf", folder / "tensor-count.gguf"
    return folder, made


ROWS = {
    "missing": "lacks 1 weight(s) its llama architecture needs (model.layers.1.self_attn.q_proj.weight), which would"
    " be random."
    " The file is incomplete or labelled with another architecture: convert the model again.",
    "extra": "holds 1 tensor(s) its llama architecture has no place for (blk.0.ffn_gate_inp.weight), which would be"
    " dropped.",
    "fewer-blocks": f"declares 4 blocks (llama.block_count) but holds tensors of blocks 0..4. {END}",
    "more-blocks": f"declares 6 blocks (llama.block_count) but holds tensors of blocks 0..4. {END}",
    "huge-blocks": f"declares 100,000 blocks (llama.block_count) but holds tensors of blocks 0..4. {END}",
    "stray-block": f"declares 5 blocks (llama.block_count) but holds tensors of blocks 0, 1, 2, 3, 4, 9. {END}",
    "other-arch": "has no valid qwen2.block_count. Convert the model again.",
    "relabelled": "lacks 15 weight(s) its qwen2 architecture needs (model.layers.0.self_attn.k_proj.bias,",
    "long-array": "(an array of 1,152,921,504,606,846,976 strings cannot fit in the",
    "tensor-count": "(4,611,686,018,427,387,904 tensors and",
}


@pytest.mark.parametrize("case", ROWS)
def test_a_bad_gguf_is_refused_before_any_work(files, tmp_path, monkeypatch, case):
    folder, made = files
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["quantize", str(made[case]), "--bits", "4", "-o", "out", "--no-eval"])
    assert time.perf_counter() - start < 20
    assert (result.exit_code, result.stdout, result.stderr.count("\n")) == (3, "", 1), result.stderr
    assert ROWS[case] in result.stderr and str(made[case]) in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["eval", "--max-tokens", "512"], ["bench", "--repeats", "1", "--new-tokens", "2"]])
def test_eval_and_bench_refuse_too_in_a_real_process(files, tmp_path, command):
    folder, made = files
    code, out, err = cli([command[0], made["missing"], *command[1:]], tmp_path)
    assert (code, out, err) == (3, "", [f"error: the GGUF file {made['missing']} {ROWS['missing']}"])
