"""Read a llama.cpp ``.gguf`` file with experts (Mixtral, which llama.cpp calls ``llama`` with
``llama.expert_count``; ``qwen3moe``) as the Hugging Face model that computes it.

transformers' GGUF loader reads neither correctly: it builds a dense Llama from a Mixtral file and
gives a Qwen3-MoE file its default expert width (it does not map ``expert_feed_forward_length``).
Here transformers still parses the hyperparameters (its GGUF config mapping); the expert settings
come from the file's own keys, and llama.cpp's routing fixes the rest (top-k weights
renormalised). Every tensor is dequantized by the ``gguf`` package (llama.cpp's reference
dequantizer) and placed by :class:`quantcli.sources.gguf_names.TensorNames`, the map the writer
uses: a stacked ``ffn_*_exps`` tensor fills its projection of the fused experts parameter, llama's q/k
rows go back from llama.cpp's rotary layout. A tensor the model has no place for, or a weight the file
lacks, is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError
from quantcli.sources.gguf_names import MODEL_TYPES_WITH_EXPERTS, TensorNames


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def experts_architecture(reader: Any) -> str | None:
    """The file's llama.cpp architecture when it has routed experts quantcli reads, else None."""
    arch = _field(reader, "general.architecture")
    return arch if arch in MODEL_TYPES_WITH_EXPERTS and (_field(reader, f"{arch}.expert_count") or 0) > 0 else None


def _config(path: Path, reader: Any, arch: str) -> Any:
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    parsed.pop("model_type", None)
    parsed.update(
        num_experts=int(_field(reader, f"{arch}.expert_count")),
        num_experts_per_tok=int(_field(reader, f"{arch}.expert_used_count")),
        tie_word_embeddings=not any(tensor.name == "output.weight" for tensor in reader.tensors),
    )
    width = _field(reader, f"{arch}.expert_feed_forward_length")
    if width:
        parsed["moe_intermediate_size"] = int(width)
    config = AutoConfig.for_model(MODEL_TYPES_WITH_EXPERTS[arch], **parsed)
    if hasattr(config, "norm_topk_prob"):
        config.norm_topk_prob = True  # llama.cpp's MoE graphs renormalise the chosen experts' weights
    return config


def _unpermute_rows(tensor: Any, heads: int) -> Any:
    """llama.cpp's rotary layout of q/k rows (pairs) back to Hugging Face's (halves)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def _values(tensor: Any) -> Any:
    """A GGUF tensor's values, float32, in numpy's order (ggml's dimensions reversed)."""
    import gguf
    import numpy as np
    import torch

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def load_model(path: Path, reader: Any, dtype: Any, device: str) -> Any:
    """The file's model, dequantized to ``dtype``, on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = experts_architecture(reader)
    config = _config(path, reader, arch)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    names = TensorNames(model)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    used, state, missing = set(), {}, []
    for key in model.state_dict():
        parts = names.parts(key)
        wanted = [name for _, name in parts] if parts else [names.of(key)]
        if config.tie_word_embeddings and wanted == ["output.weight"]:
            continue
        if any(name not in tensors for name in wanted):
            missing.append(key)
            continue
        value = torch.cat([_values(tensors[name]) for name in wanted], dim=1 if parts else 0)
        if arch == "llama" and wanted[0].endswith(("attn_q.weight", "attn_k.weight")):
            q = wanted[0].endswith("attn_q.weight")
            value = _unpermute_rows(value, config.num_attention_heads if q else config.num_key_value_heads)
        used.update(wanted)
        state[key] = value.to(dtype)
    extra = sorted(set(tensors) - used)
    if missing or extra:
        raise CheckpointError(
            f"the GGUF file {path} does not hold the {arch} mixture-of-experts model its metadata describes"
            f" (missing {', '.join(missing[:3]) or 'nothing'}; no place for {', '.join(extra[:3]) or 'nothing'})."
            " Convert the model again."
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(
            f"the GGUF file {path} has tensors of other shapes than its metadata describes: {str(error)[:300]}"
        ) from None
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()
