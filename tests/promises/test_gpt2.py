"""GPT-2's Conv1D layers (weights stored [in, out]) quantize and reload with every method."""

import pytest
import torch

import quantcli
from quantcli.config.quantize import QuantizeConfig
from tests.conftest import logits

METHODS = [(16, "cast"), (8, "rtn"), (4, "rtn"), (8, "bnb-int8"), (4, "bnb-nf4"), (4, "bnb-fp4")]


@pytest.mark.parametrize("bits,method", METHODS)
def test_gpt2_quantizes_and_reloads(tiny_gpt2, tmp_path, prompt_ids, bits, method):
    report = quantcli.quantize(
        QuantizeConfig(bits=bits, method=method, model=tiny_gpt2, output=tmp_path / "q", eval=None)
    )
    assert {name.rsplit(".", 1)[-1] for name in report.layers} == {
        "c_attn",
        "c_proj",
        "c_fc",
    }  # the embedding/head kept by default
    assert len(report.layers) == 8 and "lm_head" in report.skipped
    reloaded, _, metadata = quantcli.load(tmp_path / "q")
    again, _, _ = quantcli.load(tmp_path / "q")
    assert metadata["method"] == method
    assert torch.equal(logits(reloaded, prompt_ids), logits(again, prompt_ids))
    original = quantcli.load(tiny_gpt2)[0]
    error = (logits(reloaded, prompt_ids) - logits(original, prompt_ids)).abs().max().item()
    assert 0 < error < (0.05 if bits >= 8 else 0.5)


def test_rtn_gpt2_layers_are_quantized_on_the_input_axis(tiny_gpt2, tmp_path):
    """Conv1D stores [in, out]: groups must run along inputs, i.e. along the stored rows."""
    from quantcli.quant import ops

    quantcli.quantize(
        QuantizeConfig(
            bits=4, method="rtn", model=tiny_gpt2, output=tmp_path / "q", eval=None, method_options={"group_size": 16}
        )
    )
    original = quantcli.load(tiny_gpt2)[0].transformer.h[0].attn.c_attn.weight.data
    stored = quantcli.load(tmp_path / "q")[0].transformer.h[0].attn.c_attn.weight.data
    scale, zero_point = ops.compute_qparams(
        original.t(), 4, True, 16, "signed", torch.bfloat16
    )  # the default observer; scales in the kept dtype
    expected = ops.dequantize(ops.quantize(original.t(), scale, zero_point, 4, 16), scale, zero_point, 16).t()
    assert torch.equal(stored, expected)
    layer = quantcli.inspect(tmp_path / "q")["layers"]["transformer.h.0.attn.c_attn"]
    assert layer["shape"] == [192, 64] and "Conv1D" in layer["note"]


def test_gpt2_124m_shape_at_8_bits_is_over_3_5x_smaller_as_gguf(tmp_path):
    """GPT-2's real config (124M, random weights): --bits 8 in the portable packed path, GGUF Q8_0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.support.byte_tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config()).save_pretrained(source)  # fp32, 124M parameters, vocab 50257
    byte_level_tokenizer(GPT2Config().vocab_size).save_pretrained(source)
    output = tmp_path / "q"
    config = QuantizeConfig(
        bits=8, method="rtn", model=str(source), output=output, eval=None, format="gguf", gguf_type="Q8_0"
    )
    report = quantcli.quantize(config)
    assert report.size["disk_ratio"] >= 3.5 and report.weights["warning"] is None
