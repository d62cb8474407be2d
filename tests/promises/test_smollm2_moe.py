"""The upcycled SmolLM2 mixture-of-experts (`make smollm2-moe`, tools/upcycle_moe.py): Mixtral with
SmolLM2's attention and norms, every expert a copy of the dense MLP, a random router, top-2 with
renormalised weights. It computes SmolLM2's function, so its fp32 perplexity equals SmolLM2's, while
each expert sees different tokens. Built in memory from SmolLM2 (its weights are dequantized Q4_1)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.sources.test_smollm2 import FOLDER, REPO, WIKITEXT, needs_folder

TOKENS = 1024  # two windows of 512: the whole model twice through the MoE costs ~1 min on 2 cores


def _upcycle_module():
    spec = importlib.util.spec_from_file_location("upcycle_moe", REPO / "tools" / "upcycle_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_folder
def test_upcycled_moe_has_smollm2s_fp32_perplexity_and_spreads_tokens_over_experts():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantcli.config.quantize import EvalConfig
    from quantcli.measure.evaluation import measure_perplexity
    from quantcli.progress import NullProgress

    dense = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    moe = _upcycle_module().upcycle(dense, experts=4, top_k=2, seed=0)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    assert torch.equal(moe.model.layers[3].mlp.experts.down_proj[2], dense.model.layers[3].mlp.down_proj.weight)
    config = EvalConfig(dataset=str(WIKITEXT), seq_len=512, max_tokens=TOKENS)
    expected = measure_perplexity(dense, tokenizer, config, NullProgress(), "dense").perplexity
    routed = torch.zeros(4)

    def count(module, inputs, output) -> None:  # the router returns (logits, top-k weights, top-k experts)
        routed.add_(torch.bincount(output[2].flatten(), minlength=4))

    hook = moe.model.layers[0].mlp.gate.register_forward_hook(count)
    result = measure_perplexity(moe, tokenizer, config, NullProgress(), "moe")
    hook.remove()
    assert result.tokens_scored == TOKENS - 2 and abs(result.perplexity / expected - 1) < 1e-5
    assert routed.sum() == 2 * TOKENS and routed.min() > 0.1 * TOKENS  # top-2: every expert gets a real share


@needs_folder
def test_upcycling_refuses_biased_layers():
    config = {"attention_bias": True, "hidden_size": 8}
    with pytest.raises(SystemExit, match="biases"):
        _upcycle_module().mixtral_config(config, 4, 2)
