"""Convert karpathy's stories260K (llama2.c v0 ``.bin``) into a Hugging Face LlamaForCausalLM folder.

Run once; the result is shipped as ``quantcli/assets/stories260K``:

    python tools/convert_stories260k.py ../shared/data/stories260K quantcli/assets/stories260K

The layout and the q/k permutation follow the source's PROVENANCE.txt (itself llama2.c's
``export.py``): llama2.c rotates adjacent pairs for RoPE, transformers rotates halves, so q and k
rows are permuted per head.
"""

from __future__ import annotations

import argparse
import shutil
import struct
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

HEADER = struct.Struct("<7i")


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from llama2.c's interleaved RoPE pairs to transformers' rotate_half layout."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_llama2c(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    tied = vocab > 0
    vocab = abs(vocab)
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    flat = torch.frombuffer(bytearray(raw[HEADER.size :]), dtype=torch.float32)
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        count = 1
        for size in shape:
            count *= size
        tensor = flat[offset : offset + count].view(*shape).clone()
        offset += count
        return tensor

    embedding = take(vocab, dim)
    attn_norm = take(n_layers, dim)
    wq, wk = take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo = take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    final_norm = take(dim)
    take(seq_len, head_size // 2)  # legacy RoPE tables, recomputed by transformers
    take(seq_len, head_size // 2)
    lm_head = embedding if tied else take(vocab, dim)
    if offset != flat.numel():
        raise ValueError(f"{path}: {flat.numel() - offset} trailing floats; not a llama2.c v0 file")

    state = {"model.embed_tokens.weight": embedding, "model.norm.weight": final_norm}
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": attn_norm[i],
            prefix + "self_attn.q_proj.weight": permute_rotary(wq[i], n_heads),
            prefix + "self_attn.k_proj.weight": permute_rotary(wk[i], n_kv_heads),
            prefix + "self_attn.v_proj.weight": wv[i],
            prefix + "self_attn.o_proj.weight": wo[i],
            prefix + "post_attention_layernorm.weight": ffn_norm[i],
            prefix + "mlp.gate_proj.weight": w1[i],
            prefix + "mlp.down_proj.weight": w2[i],
            prefix + "mlp.up_proj.weight": w3[i],
        }
    if not tied:
        state["lm_head.weight"] = lm_head
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    return config, state


def convert(source: Path, target: Path) -> None:
    config, state = read_llama2c(source / "stories260K.bin")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(source / "hf-tokenizer-derived")
    tokenizer.save_pretrained(target)
    for licence in ("LICENSE.llama2.c.txt", "LICENSE.icpp_llm.txt"):
        shutil.copy(source / licence, target / licence)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with stories260K.bin and hf-tokenizer-derived/")
    parser.add_argument("target", type=Path, help="output folder (a Hugging Face checkpoint)")
    args = parser.parse_args()
    convert(args.source, args.target)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
