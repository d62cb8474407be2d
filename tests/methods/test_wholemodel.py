"""The whole model quantized (issue 14): embedding and head, 16-bit kept tensors, the signed grid, the size breakdown.

Every checkpoint must reload in plain transformers (``AutoModelForCausalLM.from_pretrained``, no
quantcli) with the logits quantcli's own loader gives, for a tied head (stories260K, Llama) and an
untied one (a random GPT-2 built with ``tie_word_embeddings=False``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quantcli
from quantcli.config.quantize import EvalConfig, QuantizeConfig
from quantcli.errors import InputError
from quantcli.methods import get_method
from quantcli.quant import ops
from tests.conftest import logits


@pytest.fixture(scope="module")
def untied_gpt2(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from quantcli.sources.models import EMBEDDED_MODEL

    folder = tmp_path_factory.mktemp("untied-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=512,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder)
    return str(folder)


def stored(folder):
    """``name -> dtype`` of every tensor in the checkpoint's safetensors files."""
    dtypes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            dtypes.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})
    return dtypes


def plain_logits(folder, ids):
    return logits(AutoModelForCausalLM.from_pretrained(folder), ids)


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("gptq", 4), ("rtn", 8)])
def test_tied_embedding_is_quantized_once_and_reloads_in_plain_transformers(
    stories_path, tmp_path, prompt_ids, method, bits
):
    evaluation = EvalConfig(max_tokens=2048)
    report = quantcli.quantize(
        QuantizeConfig(
            bits=bits, method=method, model=stories_path, output=tmp_path / "q", eval=evaluation, embeddings=8
        )
    )
    embedding, head = report.layers["model.embed_tokens"], report.layers["lm_head"]
    assert (embedding.bits, embedding.scheme, embedding.group_size, embedding.shape) == (8, "group", 32, (512, 64))
    assert (head.bits, head.scheme, head.group_size) == (8, "group", 32)
    assert head.note.startswith("tied to model.embed_tokens") and "lm_head" not in report.skipped
    files = stored(tmp_path / "q")
    assert files["model.embed_tokens.weight"] == "I8" and "lm_head.weight" not in files
    assert (
        files["lm_head.weight_scale"] == files["model.layers.0.mlp.up_proj.weight_scale"] == "BF16"
    )  # pipeline._scale_dtype
    assert files["model.norm.weight"] == "BF16" and files["model.layers.0.input_layernorm.weight"] == "BF16"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "float32"
    ours = logits(quantcli.load(tmp_path / "q")[0], prompt_ids)
    assert torch.equal(plain_logits(tmp_path / "q", prompt_ids), ours)
    # the perplexity the report gives is the stored checkpoint's, 16-bit norms included
    again = quantcli.evaluate(str(tmp_path / "q"), evaluation, device="cpu")
    assert again["perplexity"] == report.perplexity_after.perplexity


def test_untied_embedding_and_head_are_quantized_apart_and_reload_in_plain_transformers(
    untied_gpt2, tmp_path, prompt_ids
):
    report = quantcli.quantize(
        QuantizeConfig(bits=4, method="rtn", model=untied_gpt2, output=tmp_path / "q", eval=None, embeddings=8)
    )
    assert report.layers["transformer.wte"].bits == 8 and report.layers["lm_head"].bits == 8 and report.skipped == {}
    files = stored(tmp_path / "q")
    assert files["transformer.wte.weight"] == files["lm_head.weight"] == "I8"
    assert files["transformer.wpe.weight"] == "BF16"  # a position embedding is not get_input_embeddings(): kept, 16-bit
    assert torch.equal(plain_logits(tmp_path / "q", prompt_ids), logits(quantcli.load(tmp_path / "q")[0], prompt_ids))


def test_four_bit_embedding_option_is_packed_and_reloads_dequantized(untied_gpt2, tmp_path, prompt_ids):
    quantcli.quantize(
        QuantizeConfig(bits=4, method="rtn", model=untied_gpt2, output=tmp_path / "q", eval=None, embeddings=4)
    )
    files = stored(tmp_path / "q")
    assert files["transformer.wte.weight_packed"] == files["lm_head.weight_packed"] == "I32"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["dequantize"] is True
    layer = quantcli.inspect(tmp_path / "q")["layers"]["transformer.wte"]
    assert (layer["bits"], layer["group_size"]) == (4, 32)
    assert torch.equal(plain_logits(tmp_path / "q", prompt_ids), logits(quantcli.load(tmp_path / "q")[0], prompt_ids))


def test_embeddings_are_kept_by_default_and_keep_dtype_float32(stories_path, tmp_path):
    """Kept 16-bit by default: vLLM serves only an unquantized embedding and head (issue 23)."""
    report = quantcli.quantize(
        QuantizeConfig(bits=4, method="rtn", model=stories_path, output=tmp_path / "keep", eval=None)
    )
    assert "model.embed_tokens" not in report.layers and "kept" in report.skipped["model.embed_tokens"]
    assert stored(tmp_path / "keep")["model.embed_tokens.weight"] == "BF16"
    quantcli.quantize(
        QuantizeConfig(
            bits=4, method="rtn", model=stories_path, output=tmp_path / "fp32", eval=None, keep_dtype="float32"
        )
    )
    fp32 = stored(tmp_path / "fp32")
    assert fp32["model.norm.weight"] == "F32" and fp32["model.layers.0.mlp.up_proj.weight_scale"] == "F32"


def test_size_breakdown_sums_to_the_tensors_and_counts_all_parameters(stories_path, tmp_path):
    report = quantcli.quantize(
        QuantizeConfig(bits=4, method="rtn", model=stories_path, output=tmp_path / "q", eval=None, embeddings=8)
    )
    breakdown = report.size["breakdown"]
    classes = {name: value["bytes"] for name, value in breakdown["classes"].items()}
    assert classes["embeddings"] == 512 * 64  # one int8 per weight, stored once
    assert classes["head"] == 0  # tied: only its scales, counted with the scales
    assert sum(classes.values()) == breakdown["tensor_bytes"]
    assert breakdown["classes"]["scales_and_zero_points"]["dtypes"] == ["BF16"] and breakdown["classes"]["embeddings"][
        "dtypes"
    ] == ["I8"]
    assert breakdown["bits_per_weight"] == pytest.approx(8 * breakdown["tensor_bytes"] / report.size["parameters"])
    assert quantcli.inspect(tmp_path / "q")["size_breakdown"] == breakdown


def test_bnb_methods_keep_the_embedding(stories_path):
    from quantcli.quant.layers import select_modules
    from quantcli.sources.models import load_model

    model = load_model(stories_path, torch.float32, "cpu")
    selection = select_modules(model, tables=False)
    assert selection.tables == () and "lm_head" in selection.skipped and "model.embed_tokens" in selection.skipped
    assert select_modules(model, tables=True).tables == ("model.embed_tokens",)


def test_signed_observer_puts_the_largest_weight_on_the_lowest_code():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    scale, zero_point = ops.compute_qparams(weight, 4, True, 32, "signed")
    q = ops.quantize(weight, scale, zero_point, 4, 32)
    groups = weight.reshape(16, 2, 32)
    largest = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(
        q.reshape(16, 2, 32).gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1),
        torch.full((16, 2), -8, dtype=torch.int8),
    )
    assert torch.equal(scale < 0, largest > 0)  # negative where the largest weight is positive
    assert set(q.unique().tolist()) == set(range(-8, 8))  # every code is used
    error = (ops.dequantize(q, scale, zero_point, 32) - weight).abs().mean()
    assert error < (ops.fake_quantize(weight, 4, True, 32) - weight).abs().mean()


def test_signed_checkpoint_reloads_exactly_in_plain_transformers(stories_path, tmp_path, prompt_ids):
    quantcli.quantize(
        QuantizeConfig(
            bits=4,
            method="rtn",
            model=stories_path,
            output=tmp_path / "q",
            eval=None,
            method_options={"observer": "signed"},
        )
    )
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as handle:
        assert (handle.get_tensor("model.layers.0.mlp.up_proj.weight_scale") < 0).any()
    assert torch.equal(plain_logits(tmp_path / "q", prompt_ids), logits(quantcli.load(tmp_path / "q")[0], prompt_ids))


def test_bad_embeddings_and_keep_dtype_are_input_errors():
    with pytest.raises(InputError, match="embeddings must be 8, 4 or keep, got 6"):
        QuantizeConfig(bits=4, embeddings=6)
    with pytest.raises(InputError, match="keep_dtype must be auto, float32, bfloat16, float16"):
        QuantizeConfig(bits=4, keep_dtype="int8")
    with pytest.raises(InputError, match="observer signed puts each group's largest weight"):
        get_method("rtn").make_config(4, {"observer": "signed", "symmetric": False})


def test_cli_embeddings_flag(tmp_path):
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    result = CliRunner().invoke(
        app, ["quantize", "-b", "4", "--embeddings", "seven", "-o", str(tmp_path / "x"), "--no-eval"]
    )
    assert result.exit_code == 2 and "--embeddings must be 8, 4 or keep, got 'seven'" in result.output
    result = CliRunner().invoke(app, ["quantize", "-b", "8", "-o", str(tmp_path / "k"), "--no-eval", "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert "model.embed_tokens" in json.loads(result.stdout)["skipped"]  # kept by default
    result = CliRunner().invoke(
        app, ["quantize", "-b", "8", "--embeddings", "8", "-o", str(tmp_path / "e"), "--no-eval", "-q", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"]["model.embed_tokens"]["bits"] == 8
