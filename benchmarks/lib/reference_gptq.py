"""GPTQ by llm-compressor (vLLM's own quantization library), as an independent reference for quantcli's.

It gets quantcli's exact calibration windows, layer choice (lm_head skipped) and group rule (a layer
whose input width the group size does not divide gets quantcli's ``group_size_for`` size, e.g. 64 for
SmolLM2's 576-wide layers at 128: llm-compressor refuses partial groups, so each size is its own
scheme) and writes a compressed-tensors checkpoint that
``benchmarks/methods.py`` reloads and evaluates like quantcli's own.

llm-compressor pins older transformers and compressed-tensors than quantcli uses, so it is
installed without dependencies into a side folder (``make bench`` does:
``pip install --no-deps --target .reference llmcompressor loguru ...``) and imported from there.
"""

from __future__ import annotations

from pathlib import Path

import torch


def quantize(
    model_path: str | Path, calibration: torch.Tensor, bits: int, group_size: int | None, output: Path
) -> None:
    """Symmetric INT``bits`` GPTQ (act-order with static groups, damp 0.01) of every Linear but lm_head."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from loguru import logger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantcli.quant.intgrid import group_size_for

    logger.disable("llmcompressor")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    sizes: dict[int | None, list[str]] = {}
    for name, module in layers.items():
        sizes.setdefault(group_size_for(module.in_features, group_size) if group_size else None, []).append(name)
    schemes = {}
    for size, names in sizes.items():
        if size is None:
            args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
        else:
            args = QuantizationArgs(
                num_bits=bits, type="int", symmetric=True, strategy="group", group_size=size, actorder="static"
            )
        schemes[f"group_{size}" if size else "per_channel"] = QuantizationScheme(targets=names, weights=args)
    windows = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    recipe = GPTQModifier(config_groups=schemes, dampening_frac=0.01)
    oneshot(
        model=model,
        dataset=windows,
        recipe=recipe,
        num_calibration_samples=len(calibration),
        max_seq_length=calibration.shape[1],
    )
    model.save_pretrained(output, save_compressed=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(output)
