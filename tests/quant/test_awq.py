"""AWQ's scaling (quantcli.quant.awq): folded scales keep the full-precision model's function, producers are
found generically (Llama norms and up_proj; GPT-2's LayerNorms, its GELU and fused qkv rejected), and the
search lowers the rounding error where activations have outlier channels."""

from __future__ import annotations

import torch

from quantcli.quant.awq import _search, awq_step, grid_rounding
from quantcli.quant.blockwise import ModelBlocks, quantize_blockwise
from quantcli.quant.intgrid import IntLayout, plan_layouts
from quantcli.quant.layers import select_modules
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import load_model, load_tokenizer
from tests.conftest import logits


def scaled_only(path: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, list[str]]]:
    """The original model, the same model after AWQ's scaling of every block (weights not quantized), and
    the layer notes."""
    tokenizer = load_tokenizer(path)
    calibration = calibration_batch(read_documents("tinystories:calib"), tokenizer, 8, 64, 0)
    original, model = load_model(path, torch.float32, "cpu"), load_model(path, torch.float32, "cpu")
    names = select_modules(model).names
    plan = plan_layouts(model, names, 4, True, 32, "signed", "bfloat16")
    notes: dict[str, list[str]] = {name: [] for name in names}
    prepare = awq_step(model, plan, notes)
    quantize_blockwise(ModelBlocks(model, names), names, calibration, lambda n, h: None, {}, prepare)
    return original, model, notes


def test_llama_scaling_keeps_the_function_and_folds_into_the_norms_and_up_proj(stories_path, prompt_ids):
    original, scaled, notes = scaled_only(stories_path)
    torch.testing.assert_close(logits(scaled, prompt_ids), logits(original, prompt_ids), rtol=1e-4, atol=1e-4)
    block = "model.layers.1."
    for layers, producer in (("self_attn.q_proj", "input_layernorm"), ("mlp.gate_proj", "post_attention_layernorm")):
        assert notes[block + layers][0].endswith(f"folded into {block}{producer}")
    assert notes[block + "mlp.down_proj"][0].endswith(f"folded into {block}mlp.up_proj")
    # grouped-query attention: v_proj has half o_proj's input channels, so nothing before o_proj can take them
    unscaled = "awq: not scaled (no operation before it can absorb per-channel scales)"
    assert notes[block + "self_attn.o_proj"] == [unscaled]
    norms = [n for n, _ in original.named_parameters() if n.endswith("layernorm.weight")]
    changed = dict(scaled.named_parameters())
    assert any(not torch.equal(p, changed[n]) for n, p in original.named_parameters() if n in norms)


def test_gpt2_scaling_folds_into_layernorms_and_rejects_gelu_and_fused_qkv(tiny_gpt2, prompt_ids):
    original, scaled, notes = scaled_only(tiny_gpt2)
    torch.testing.assert_close(logits(scaled, prompt_ids), logits(original, prompt_ids), rtol=1e-4, atol=1e-4)
    block = "transformer.h.0."
    assert notes[block + "attn.c_attn"][0].endswith(f"folded into {block}ln_1")
    assert notes[block + "mlp.c_fc"][0].endswith(f"folded into {block}ln_2")
    for layer in ("attn.c_proj", "mlp.c_proj"):  # after attention's softmax, after c_fc's GELU
        assert notes[block + layer][0].startswith("awq: not scaled")


def test_search_lowers_the_rounding_error_of_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=generator)
    x[:, :4] *= 30  # a few input channels far larger than the rest, as in LLM activations
    weight = torch.randn(96, 64, generator=generator)
    linear = torch.nn.Linear(64, 96, bias=False)
    linear.weight.data.copy_(weight)
    hessian = 2 * x.T @ x / x.shape[0]
    rounded = grid_rounding({"layer": IntLayout(3, True, 32, "signed")})

    def error(factors: torch.Tensor) -> float:
        difference = weight - rounded("layer", weight * factors) / factors
        return float(((difference @ hessian) * difference).sum())

    alpha, factors = _search(["layer"], [linear], hessian, x.abs().mean(0), rounded)
    assert alpha > 0
    assert error(factors) < 0.8 * error(torch.ones(64))
