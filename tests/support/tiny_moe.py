"""Random tiny mixture-of-experts checkpoints (Qwen3-MoE or Mixtral) with the stories260K tokenizer, for the
MoE tests: one builder, each test choosing its widths, expert count and dtype."""

from __future__ import annotations

from typing import Any

import torch

from quantcli.sources.models import EMBEDDED_MODEL


def build_tiny_moe(
    kind: str,
    folder: Any,
    *,
    hidden: int,
    head_dim: int,
    expert_width: int,
    dense_width: int,
    experts: int,
    dtype: torch.dtype,
    router_scale: float = 1.0,
    qwen3_moe: dict[str, Any] | None = None,
    **shared: Any,
) -> str:
    """``kind`` (``qwen3_moe`` or ``mixtral``), 2 layers, 4 heads (2 KV), top-2, seed 0, saved to ``folder``.
    ``dense_width`` is Qwen3-MoE's ``intermediate_size`` (Mixtral's is ``expert_width``); ``qwen3_moe`` holds
    settings for that config only, ``shared`` for both; the routers are multiplied by ``router_scale``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=512,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **shared,
    )
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(
            intermediate_size=dense_width,
            moe_intermediate_size=expert_width,
            num_experts=experts,
            **(qwen3_moe or {}),
            **common,
        )
    else:
        config = MixtralConfig(intermediate_size=expert_width, num_local_experts=experts, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if router_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.mul_(router_scale)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder)
    return str(folder)
