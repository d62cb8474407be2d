"""Upcycle a dense Llama-architecture model (SmolLM2) into a Mixtral mixture-of-experts with the same
function: its attention, norms and embeddings; every expert a copy of the dense MLP; a random router
picking the top 2 with renormalised weights. The weights of the chosen experts sum to 1 and the experts
are equal, so the MoE computes the dense model's output (to float rounding) while each expert sees
different tokens: expert quantization measured on real weights. Used by ``make smollm2-moe``.

    python tools/upcycle_moe.py .models/SmolLM2-135M-Instruct .models/SmolLM2-135M-MoE [--experts 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def mixtral_config(dense: dict, experts: int, top_k: int) -> dict:
    """A MixtralConfig's arguments from a Llama config (no attention/MLP biases: Mixtral has none)."""
    if dense.get("attention_bias") or dense.get("mlp_bias"):
        raise SystemExit("the dense model has attention or MLP biases, which Mixtral's layers do not hold.")
    kept = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    return {
        **{key: dense[key] for key in kept if key in dense},
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
        "dtype": dense.get("dtype", "float32"),
    }


def upcycle(dense_model, experts: int = 4, top_k: int = 2, seed: int = 0):
    """The Mixtral model (in memory) upcycled from ``dense_model`` (a LlamaForCausalLM)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**mixtral_config(dense_model.config.to_dict(), experts, top_k))
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in dense_model.state_dict().items():
        if ".mlp." not in key:
            state[key] = value
    hidden = config.hidden_size
    for index, layer in enumerate(dense_model.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        prefix = f"model.layers.{index}.mlp"
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        state[f"{prefix}.experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(experts, 1, 1)
        router = torch.randn(experts, hidden, generator=generator) / hidden**0.5
        state[f"{prefix}.gate.weight"] = router.to(gate_up.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    buffers = dict(dense_model.named_buffers())
    for name, buffer in list(model.named_buffers()):  # the rotary tables, not in any state dict
        if buffer.device.type == "meta" and name in buffers:
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(leaf, buffers[name].clone(), persistent=False)
    missing = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.device.type == "meta"
    ]
    if missing:
        raise SystemExit(f"upcycling left tensors unset: {missing[:3]}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32)
    model = upcycle(dense, args.experts, args.top_k, args.seed)
    staging = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in COPIED:
        if (args.source / name).is_file():
            shutil.copy(args.source / name, staging / name)
    provenance = {
        "upcycled_from": str(args.source),
        "experts": args.experts,
        "top_k": args.top_k,
        "router_seed": args.seed,
        "router": "normal(0, 1/sqrt(hidden)); every expert a copy of the dense MLP",
    }
    (staging / "upcycle.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(args.output, ignore_errors=True)
    staging.rename(args.output)


if __name__ == "__main__":
    main()
