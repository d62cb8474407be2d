"""Write a Llama folder (stories260K) as a GGUF file with the ``gguf`` package's writer, as llama.cpp's
``convert_hf_to_gguf.py`` does: tensor names from the package's map, q/k rows permuted back to
Meta's interleaved RoPE layout, the SentencePiece vocabulary with its merges, and 2-D weights
quantized with the package's own block quantizers. CI can make it without llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half rows to llama.cpp's interleaved pairs (``LlamaModel.permute``)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(folder: str | Path, path: Path, weight_type: str = "F32") -> Path:
    """``folder``'s weights and tokenizer as ``path``; 2-D weights whose rows split into blocks get ``weight_type``."""
    import gguf

    config = json.loads((Path(folder) / "config.json").read_text())
    tokenizer = json.loads((Path(folder) / "tokenizer.json").read_text())
    kind = gguf.GGMLQuantizationType[weight_type]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{weight_type}" if weight_type != "F32" else "ALL_F32"])

    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {item["id"] for item in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0 if i in special else -float(i) for i in range(len(tokens))])
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL
            if i in special
            else gguf.TokenType.BYTE
            if token.startswith("<0x")
            else gguf.TokenType.NORMAL
            for i, token in enumerate(tokens)
        ]
    )
    writer.add_token_merges(
        [" ".join(merge) if isinstance(merge, list) else merge for merge in tokenizer["model"]["merges"]]
    )
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(0)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, tensor in load_file(Path(folder) / "model.safetensors").items():
        data = tensor.to(torch.float32).numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            data = permute_rotary(data, heads)
        target = names.get_name(name, try_suffixes=(".weight",))
        if (
            data.ndim == 2
            and data.shape[1] % gguf.GGML_QUANT_SIZES[kind][0] == 0
            and kind != gguf.GGMLQuantizationType.F32
        ):
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized by the ``gguf`` package, in the file's names and ``[out, in]`` shape."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        tensor.name: gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed(tensor.shape.tolist()))
        )
        for tensor in reader.tensors
    }
