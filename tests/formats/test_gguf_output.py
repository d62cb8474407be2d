"""GGUF output (--format gguf): llama.cpp's block grids bit for bit against the gguf package, the file
and its per-tensor types, GPTQ on the grid, the CLI and its errors. The llama.cpp checks are in
test_gguf_llamacpp.py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import quantcli
from quantcli.cli.app import app
from quantcli.config.quantize import QuantizeConfig
from quantcli.formats.gguf.types import LEGACY, BlockWeights, FixedGrid, dequantize, pack, round_to_nearest
from quantcli.formats.gguf.writer import gguf_file

runner = CliRunner()


@pytest.fixture(scope="module")
def matrices(stories_path):
    """Every stories260K weight llama.cpp would block (width a multiple of 32), plus blocks with ties and zeros."""
    found = [
        value
        for value in load_file(f"{stories_path}/model.safetensors").values()
        if value.ndim == 2 and value.shape[1] % 32 == 0
    ]
    edges = torch.zeros(4, 64)
    edges[1, :32] = 0.25  # a constant block: Q4_1's d is 0
    edges[2] = torch.linspace(-1, 1, 64)  # exact halves after scaling
    edges[3, 5], edges[3, 40] = -0.5, 0.5  # equal magnitudes of both signs: the first one sets the sign
    return found + [edges]


@pytest.mark.parametrize("name", LEGACY)
def test_rounding_is_llamacpps_reference_quantizer_bit_for_bit(matrices, name):
    qtype = gguf.GGMLQuantizationType[name]
    for matrix in matrices:
        record = round_to_nearest(matrix, LEGACY[name])
        assert np.array_equal(pack(record), gguf.quants.quantize(matrix.numpy(), qtype)), matrix.shape


@pytest.mark.parametrize("name", LEGACY)
def test_packed_blocks_read_back_through_ggufs_dequantizer(name):
    """Any codes in range with any fp16 scales (as GPTQ chooses them) unpack to what quantcli computed with."""
    kind = LEGACY[name]
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(kind.lowest, kind.highest + 1, (8, 96), generator=generator, dtype=torch.int8)
    scale = (torch.randn(8, 3, generator=generator) * 0.01).half()
    minimum = (torch.randn(8, 3, generator=generator) * 0.05).half() if kind.has_min else None
    record = BlockWeights(codes, scale, minimum, kind)
    theirs = gguf.quants.dequantize(pack(record), gguf.GGMLQuantizationType[name])
    assert np.array_equal(theirs, dequantize(record).numpy())


@pytest.mark.parametrize("name", LEGACY)
def test_fixed_grid_rounds_to_the_stored_values(matrices, name):
    """Without error feedback the fixed grid gives llama.cpp's codes (up to exact ties) and the values
    the file will hold: what GPTQ's error feedback assumes is what llama.cpp computes with."""
    matrix, kind = matrices[0], LEGACY[name]
    grid = FixedGrid(matrix, kind)
    columns = [grid.round(matrix[:, column], column // 32) for column in range(matrix.shape[1])]
    codes = torch.stack([code for code, _ in columns], dim=1)
    values = torch.stack([value for _, value in columns], dim=1)
    record = grid.record(codes)
    assert torch.equal(values, dequantize(record))
    reference = round_to_nearest(matrix, kind)
    assert (record.codes != reference.codes).float().mean() < 0.01  # fp16 vs fp32 scale at exact ties only


def test_quantize_writes_one_gguf_with_llamacpps_tensor_types(tmp_path):
    result = runner.invoke(
        app,
        [
            "quantize",
            "--format",
            "gguf",
            "--gguf-type",
            "Q4_0",
            "-o",
            str(tmp_path / "out"),
            "--no-eval",
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "gguf" and report["bits"] == 4 and report["options"] == {"gguf_type": "Q4_0"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".gguf") == ["model-Q4_0.gguf"]
    reader = gguf.GGUFReader(gguf_file(tmp_path / "out"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (
        types["token_embd.weight"] == "Q8_0"
    )  # tied to the output: llama.cpp's head type (Q6_K falls back to Q8_0 at width 64)
    assert types["blk.0.attn_q.weight"] == types["blk.4.ffn_up.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # 172 inputs: not a multiple of 32
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types
    assert report["layers"]["model.layers.0.mlp.down_proj"]["bits"] == 16
    assert "in_features 172" in report["layers"]["model.layers.0.mlp.down_proj"]["note"]
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert (
        fields["tokenizer.ggml.model"].contents() == "llama" and len(fields["tokenizer.ggml.tokens"].contents()) == 512
    )
    assert fields["llama.attention.head_count_kv"].contents() == 4
    assert report["size"]["quantized_disk_bytes"] == (tmp_path / "out" / "model-Q4_0.gguf").stat().st_size


def test_eval_of_the_output_folder_needs_no_flags_and_matches_the_run(tmp_path):
    """The folder reloads through transformers' GGUF loader: the model quantcli measured after quantizing."""
    report = quantcli.quantize(
        QuantizeConfig(
            bits=5, model="stories260K", method="rtn", output=tmp_path / "out", format="gguf", gguf_type="Q5_1"
        )
    )
    result = runner.invoke(app, ["eval", str(tmp_path / "out"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(report.perplexity_after.perplexity, rel=1e-5)
    assert quantcli.inspect(tmp_path / "out")["format"] == "gguf"


def test_gptq_on_the_grid_beats_rounding_at_the_same_size(tmp_path):
    reports = {}
    for method in ("rtn", "gptq"):
        config = QuantizeConfig(
            bits=4,
            model="stories260K",
            method=method,
            output=tmp_path / method,
            format="gguf",
            gguf_type="Q4_0",
            method_options={},
            eval=quantcli.EvalConfig(max_tokens=8192),
        )
        reports[method] = quantcli.quantize(config)
    sizes = {method: gguf_file(tmp_path / method).stat().st_size for method in reports}
    assert sizes["rtn"] == sizes["gptq"]
    rtn, gptq = (
        reports[m].perplexity_after.perplexity - reports[m].perplexity_before.perplexity for m in ("rtn", "gptq")
    )
    assert 0 < gptq < 0.7 * rtn, (gptq, rtn)  # on 32,768 tokens: +3.5% against +6.1% (benchmarks/gguf_export.py)


def test_gpt2_conv1d_is_written_transposed(tiny_gpt2, tmp_path):
    quantcli.quantize(
        QuantizeConfig(
            bits=8, model=tiny_gpt2, method="rtn", output=tmp_path / "out", eval=None, format="gguf", gguf_type="Q8_0"
        )
    )
    reader = gguf.GGUFReader(gguf_file(tmp_path / "out"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    original = quantcli.load(tiny_gpt2)[0].transformer.h[0].attn.c_attn.weight.data  # Conv1D: [in 64, out 192]
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [out, in]
    assert stored.shape == (192, 64)
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(original.t().numpy(), tensor.tensor_type), tensor.tensor_type
    )
    assert np.array_equal(stored, expected)
    reloaded = quantcli.load(tmp_path / "out")[0].transformer.h[0].attn.c_attn.weight.data
    assert torch.equal(reloaded, torch.from_numpy(expected).t())


@pytest.mark.parametrize(
    "args,code,message",
    [
        (
            ["--format", "gguf", "--gguf-type", "Q4_0", "-m", "bnb-nf4"],
            2,
            "--format gguf works with --method rtn or blockround or gptq, not bnb-nf4.",
        ),
        (
            ["--format", "gguf", "--gguf-type", "Q2_K"],
            2,
            "--gguf-type must be one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, Q3_K_M, Q4_K_M, Q5_K_M,"
            " got 'Q2_K'.",
        ),
        (
            ["--format", "gguf", "--bits", "4"],
            2,
            "--format gguf needs --gguf-type: one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, Q3_K_M,"
            " Q4_K_M, Q5_K_M.",
        ),
        (["--gguf-type", "Q4_0"], 2, "--gguf-type needs --format gguf."),
        (
            ["--format", "safetensors", "--bits", "4"],
            2,
            "--format takes gguf (other formats follow from --method), got 'safetensors'.",
        ),
        (
            ["--format", "gguf", "--gguf-type", "Q8_0", "--bits", "4"],
            2,
            "--gguf-type Q8_0 stores 8-bit codes, but --bits is 4. Drop --bits (the type sets it).",
        ),
        (
            ["--format", "gguf", "--gguf-type", "Q8_0", "--low-memory", "--no-eval"],
            2,
            "--format gguf writes one file from the whole model; drop --low-memory.",
        ),
    ],
)
def test_bad_gguf_options_fail_before_any_work(tmp_path, args, code, message):
    result = runner.invoke(app, ["quantize", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == code
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_other_architectures_get_one_line_naming_those_that_work(tmp_path, stories_path):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    folder = tmp_path / "mistral"
    torch.manual_seed(0)
    MistralForCausalLM(
        MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        )
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_path).save_pretrained(folder)
    result = runner.invoke(
        app,
        ["quantize", str(folder), "--format", "gguf", "--gguf-type", "Q8_0", "--no-eval", "-o", str(tmp_path / "out")],
    )
    assert result.exit_code == 5
    assert (
        result.stderr.strip()
        == "error: GGUF output supports Llama-family, GPT-2, Mixtral and Qwen3-MoE models (model_type llama, gpt2,"
        " mixtral, qwen3_moe), not mistral."
    )
