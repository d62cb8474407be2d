"""Hugging Face tensor names and llama.cpp's, both ways, for the GGUF writer and reader.

A name is looked up in the ``gguf`` package's own map (``gguf.get_tensor_name_map``) as the model
names it, then as its checkpoint stores it (transformers' load-time renamings reversed, e.g.
Mixtral's ``mlp`` is ``block_sparse_moe`` on disk). Experts: a fused parameter
(``experts.gate_up_proj``) or one expert's layer (``experts.3.w1``) is llama.cpp's stacked tensor of
that projection (``blk.N.ffn_gate_exps.weight``, ``[experts, rows, cols]``), found by the merged name
llama.cpp's converter gives it (``experts.w1``); the projections of a fused parameter come from
transformers' conversion mapping (:func:`quantcli.quant.moe.expert_layouts`).
"""

from __future__ import annotations

from typing import Any

from quantcli.quant.moe import EXPERT_LAYER, expert_layouts, fused_experts

# model_type -> llama.cpp architecture: Mixtral is llama.cpp's ``llama`` with experts
ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
# llama.cpp architecture of a file with experts -> the Hugging Face model_type that computes it
MODEL_TYPES_WITH_EXPERTS = {"llama": "mixtral", "qwen3moe": "qwen3_moe"}


def architecture(config: Any) -> str | None:
    """The llama.cpp architecture a model of this config is written as, or None."""
    return ARCHITECTURES.get(config.model_type)


def expert_count(config: Any) -> int:
    """Routed experts per layer (0: a dense model)."""
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


def _checkpoint_namer(model: Any) -> Any:
    """A model tensor name -> the name its checkpoint stores (transformers' plain renamings reversed)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    reverse = [
        t.reverse_transform() for t in get_model_conversion_mapping(model) if type(t).__name__ == "WeightRenaming"
    ]

    def name(key: str) -> str:
        for renaming in reverse:
            key = renaming.rename_source_key(key)[0]
        return key

    return name


class TensorNames:
    """llama.cpp's name of each of ``model``'s tensors (fused or unfused experts alike)."""

    def __init__(self, model: Any) -> None:
        import gguf

        config = model.config
        self.arch = architecture(config)
        self.map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch.upper()], config.num_hidden_layers)
        self.checkpoint_name = _checkpoint_namer(model)
        layouts = expert_layouts(model) if fused_experts(model) else {}
        self.fused = {  # fused parameter key -> its projections, in concatenation order
            f"{module}.{parameter}": layouts[parameter].names
            for module, fused in fused_experts(model).items()
            for parameter, _ in fused.named_parameters(recurse=False)
            if parameter in layouts
        }

    def of(self, key: str) -> str | None:
        """llama.cpp's name of tensor ``key`` (``...weight``/``...bias``; an expert layer's ``.weight``)."""
        match = EXPERT_LAYER.search(key.removesuffix(".weight"))
        if match:  # experts.3.w1.weight -> experts.w1.weight, the name of the stacked tensor
            key = f"{key[: match.start()]}.experts.{match.group(2)}.weight"
        for candidate in dict.fromkeys((key, self.checkpoint_name(key))):
            name = self.map.get_name(candidate, try_suffixes=(".weight", ".bias"))
            if name is not None:
                return name
        return None

    def of_layer(self, layer: str) -> str | None:
        """llama.cpp's name of the weight of module ``layer`` (one expert's: its stacked tensor's)."""
        return self.of(f"{layer}.weight")

    def parts(self, key: str) -> list[tuple[str, str | None]] | None:
        """For a fused experts parameter: ``(projection, llama.cpp name)`` in concatenation order; else None."""
        names = self.fused.get(key)
        if names is None:
            return None
        module = key.rpartition(".")[0]
        return [(part, self.of(f"{module}.{part}.weight")) for part in names]
