"""GGUF K-quants (Q3_K, Q4_K, Q5_K, Q6_K) and the Q3_K_M/Q4_K_M mixes: packing against the gguf package's
dequantizer, GPTQ's grid (with and without an importance vector), llama.cpp's per-tensor types and
fallbacks. Byte identity with libggml's own quantizer and llama.cpp running the files are in
test_gguf_llamacpp.py."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import quantcli
from quantcli.config.quantize import QuantizeConfig
from quantcli.formats.gguf.kquant_layout import BLOCK_BYTES
from quantcli.formats.gguf.kquants import K_TYPES, KGrid, KWeights, dequantize, pack, round_to_nearest
from quantcli.formats.gguf.types import block_type, tensor_type
from quantcli.formats.gguf.writer import gguf_file


@pytest.fixture(scope="module")
def wide(stories_path):
    """Every stories260K weight with rows cut to 256 inputs (its layers are 64 and 172 wide), plus edge rows."""
    found = [
        value.reshape(-1, 256)
        for value in load_file(f"{stories_path}/model.safetensors").values()
        if value.numel() % 256 == 0 and value.ndim == 2
    ]
    edges = torch.zeros(4, 256)
    edges[1, :32] = 0.25  # a constant sub-block
    edges[2] = torch.linspace(-1, 1, 256)
    edges[3, 5], edges[3, 40] = -0.5, 0.5  # equal magnitudes of both signs
    return found + [edges]


@pytest.mark.parametrize("name", K_TYPES)
def test_rounded_weights_read_back_through_ggufs_dequantizer(wide, name):
    """llama.cpp's reference rounding of real weights, packed, unpacks to the values quantcli computes with."""
    for matrix in wide:
        record = round_to_nearest(matrix, K_TYPES[name])
        data = pack(record)
        assert data.shape == (matrix.shape[0], BLOCK_BYTES[name])
        theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
        assert np.array_equal(theirs, dequantize(record).numpy())
        bound = np.abs(matrix.numpy()).max() / (3 if name == "Q3_K" else 6)
        assert np.abs(theirs - matrix.numpy()).max() <= bound  # the rounding is close


@pytest.mark.parametrize("name", K_TYPES)
def test_any_codes_and_scales_pack_as_ggml_lays_them_out(name):
    """Any codes and sub-block scales in range (as GPTQ chooses codes) unpack to what quantcli computed with."""
    kind = K_TYPES[name]
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(kind.lowest, kind.highest + 1, (6, 512), generator=generator, dtype=torch.int8)
    subs = 512 // kind.sub
    low, high = (0, 64) if kind.has_min else (-32, 32) if name == "Q3_K" else (-128, 128)
    scales = torch.randint(low, high, (6, subs), generator=generator)
    mins = torch.randint(0, 64, (6, subs), generator=generator) if kind.has_min else None
    d = (torch.rand(6, 2, generator=generator) * 0.01).half()
    dmin = (torch.rand(6, 2, generator=generator) * 0.01).half() if kind.has_min else None
    record = KWeights(codes, scales.to(torch.int16), None if mins is None else mins.to(torch.int16), d, dmin, kind)
    theirs = gguf.quants.dequantize(pack(record), gguf.GGMLQuantizationType[name])
    assert np.array_equal(theirs, dequantize(record).numpy())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", K_TYPES)
def test_k_grid_rounds_to_the_stored_values(wide, name, weighted):
    """Without error feedback the K grid gives llama.cpp's codes (up to exact ties) and the file's values,
    its scales from the reference search or from the importance-weighted one."""
    matrix = wide[0]
    importance = torch.rand(256, generator=torch.Generator().manual_seed(1)) if weighted else None
    grid = KGrid(matrix, K_TYPES[name], importance)
    sub = K_TYPES[name].sub
    columns = [grid.round(matrix[:, column], column // sub) for column in range(matrix.shape[1])]
    record = grid.record(torch.stack([code for code, _ in columns], dim=1))
    assert torch.equal(torch.stack([value for _, value in columns], dim=1), dequantize(record))
    assert torch.equal(grid.values(matrix), dequantize(record))
    assert (record.codes != round_to_nearest(matrix, K_TYPES[name], importance).codes).float().mean() < 0.01


def test_tensor_types_follow_llamacpps_q4_k_m_rule():
    """SmolLM2-135M's shapes (30 layers, 576 wide, ffn_down 1536 wide): the types llama.cpp's own Q4_K_M
    file of it holds (read with gguf.GGUFReader: ffn_down Q6_K in 14 layers, Q4_K in 16; attn_v Q8_0
    in the same 14, Q5_0 elsewhere; everything else 576 wide Q5_0; the tied embedding Q8_0)."""
    mix = block_type("Q4_K_M")
    down = [tensor_type(mix, f"blk.{i}.ffn_down.weight", 1536, 30)[0] for i in range(30)]
    value = [tensor_type(mix, f"blk.{i}.attn_v.weight", 576, 30)[0] for i in range(30)]
    more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i, t in enumerate(down) if t == "Q6_K"] == more and down.count("Q4_K") == 16
    assert [i for i, t in enumerate(value) if t == "Q8_0"] == more and value.count("Q5_0") == 16
    assert tensor_type(mix, "blk.7.attn_q.weight", 576, 30)[0] == "Q5_0"
    assert tensor_type(mix, "output.weight", 576, 30, head=True) == ("Q8_0", None)
    assert tensor_type(mix, "output.weight", 768, 12, head=True) == ("Q6_K", None)
    assert (
        tensor_type(block_type("Q4_0"), "output.weight", 768, 12, head=True)[0] == "Q6_K"
    )  # GPT-2's head, as llama.cpp
    assert tensor_type(block_type("Q8_0"), "output.weight", 768, 12, head=True)[0] == "Q8_0"
    assert tensor_type(block_type("Q6_K"), "blk.0.ffn_down.weight", 172, 5)[0] == "F16"


def test_stories260k_q4_k_m_is_all_fallbacks_as_in_llamacpp(tmp_path):
    """stories260K's rows (64 and 172 wide) fit no block of 256: llama.cpp's Q4_K_M file of it holds
    Q5_0, Q8_0 and F16 only (benchmarks/results/stories260K/llamacpp.json), and so does quantcli's."""
    report = quantcli.quantize(
        QuantizeConfig(
            bits=4,
            model="stories260K",
            method="rtn",
            output=tmp_path / "out",
            eval=None,
            format="gguf",
            gguf_type="Q4_K_M",
        )
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file(tmp_path / "out")).tensors}
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(5)] == [
        "Q5_0",
        "Q5_0",
        "Q8_0",
        "Q5_0",
        "Q8_0",
    ]  # use_more_bits of 5 layers
    assert types["blk.0.attn_q.weight"] == types["blk.4.ffn_up.weight"] == "Q5_0"
    assert types["blk.0.ffn_down.weight"] == "F16" and types["token_embd.weight"] == "Q8_0"
    assert (
        sum(t == "Q8_0" for t in types.values()) == 3 and "Q4_K" not in types.values() and "Q6_K" not in types.values()
    )
    layer = report.layers["model.layers.2.self_attn.v_proj"]
    assert (layer.scheme, layer.bits, layer.group_size) == ("Q8_0", 8, 32)
    assert layer.note == (
        "Q6_K: llama.cpp's Q4_K_M gives this layer more bits; "
        "Q8_0: llama.cpp's fallback for Q6_K, whose blocks of 256 do not fit in_features 64"
    )


def test_tensor_types_follow_llamacpps_q3_k_m_rule():
    """llama.cpp's Q3_K_M (``llama_tensor_get_type``): attn_v Q5_K in layers 0-1 then Q4_K, ffn_down Q5_K in
    the first sixteenth then Q4_K, attn_output Q4_K, other weights Q3_K; on SmolLM2's 576-wide rows the
    fallbacks Q5_1, Q5_0 and Q4_0 (its llama.cpp Q3_K_M file, read with gguf.GGUFReader, holds exactly these)."""
    mix = block_type("Q3_K_M")
    assert [tensor_type(mix, f"blk.{i}.attn_v.weight", 256, 30)[0] for i in (0, 1, 2, 29)] == [
        "Q5_K",
        "Q5_K",
        "Q4_K",
        "Q4_K",
    ]
    assert [tensor_type(mix, f"blk.{i}.ffn_down.weight", 1536, 30)[0] for i in range(3)] == ["Q5_K", "Q4_K", "Q4_K"]
    assert tensor_type(mix, "blk.4.attn_output.weight", 256, 30)[0] == "Q4_K"
    assert tensor_type(mix, "blk.4.ffn_gate.weight", 256, 30) == ("Q3_K", None)
    assert tensor_type(mix, "blk.0.attn_v.weight", 576, 30) == (
        "Q5_1",
        "Q5_K: llama.cpp's Q3_K_M gives this layer more bits; "
        "Q5_1: llama.cpp's fallback for Q5_K, whose blocks of 256 do not fit in_features 576",
    )
    assert tensor_type(mix, "blk.5.attn_q.weight", 576, 30)[0] == "Q4_0"
    assert tensor_type(mix, "blk.5.attn_output.weight", 576, 30)[0] == "Q5_0"
    assert tensor_type(mix, "output.weight", 576, 30, head=True)[0] == "Q8_0"
    assert tensor_type(block_type("Q5_K_M"), "blk.0.attn_qkv.weight", 768, 12)[0] == "Q6_K"
    assert tensor_type(block_type("Q4_K_M"), "blk.3.attn_qkv.weight", 768, 12)[0] == "Q5_K"


def test_gptq_importance_without_a_gguf_grid_is_refused(tmp_path):
    """importance steers a GGUF block type's scale search: a compressed-tensors run refuses it in one line."""
    with pytest.raises(quantcli.errors.InputError) as error:
        quantcli.quantize(
            QuantizeConfig(
                bits=4,
                model="stories260K",
                method="gptq",
                output=tmp_path / "out",
                eval=None,
                method_options={"importance": True},
            )
        )
    assert str(error.value) == (
        "importance=True steers the scale search of a GGUF block type; add format='gguf', or drop importance=True."
    )
