"""The compressed-tensors layout of a quantcli checkpoint: each layer's storage kind, the config groups
(schemes) vLLM and transformers select kernels by, and the quantization section of config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli.quant.intgrid import IntLayout
from quantcli.quant.layers import is_conv1d, is_tied

CONV1D_NOTE = (
    "stored dense (fake-quantized): compressed-tensors cannot pack GPT-2 Conv1D so that transformers reloads it;"
    " --format gguf stores GPT-2 packed (llama.cpp reads it)"
)


def quiet_library_logs() -> None:
    from loguru import logger

    logger.disable("compressed_tensors")


def storage_note(module: Any) -> str | None:
    """Why a layer's integers cannot be stored packed, or None when they can."""
    return CONV1D_NOTE if is_conv1d(module) else None


def storage_kind(layout: IntLayout) -> str:
    """The compressed-tensors format one layer is stored in, as vLLM's scheme selection reads it
    (vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py, 0.32):

    - W8A8 (``activations="int8"``): ``int-quantized`` with dynamic per-token int8 input activations,
      which vLLM serves as ``CompressedTensorsW8A8Int8`` (CPU: ``CPUInt8ScaledMMLinearKernel``);
    - weight-only linears at every width, 8 bits included: ``pack-quantized`` (int32 words), the one
      weight-only format vLLM's ``CompressedTensorsWNA16`` takes, and what compressed-tensors' own
      ``infer_module_format`` picks for llm-compressor's W8A16 preset (``int-quantized`` only with
      input activations). vLLM rejects an ``int-quantized`` group without input activations unless its
      weights are floats (its config asserts it), so plain int8 weight-only cannot be served;
    - an 8-bit embedding/head (``--embeddings 8``, which vLLM cannot serve anyway): ``int-quantized``,
      whose plain ``weight`` transformers ties the head to.
    """
    if layout.activations is not None or (layout.bits == 8 and layout.table):
        return "int-quantized"
    return "pack-quantized"


def schemes(layouts: dict[str, IntLayout]) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from quantcli.quant.moe import expert_target, is_expert_layer

    groups: dict[tuple, list[str]] = {}
    for name, layout in layouts.items():  # experts in groups of their own (see quantcli.quant.moe.expert_target)
        key = (
            layout.bits,
            layout.group_size,
            layout.symmetric,
            storage_kind(layout),
            layout.activations,
            is_expert_layer(name),
        )
        groups.setdefault(key, []).append(name)
    schemes = {}
    ordered = sorted(groups.items(), key=lambda item: str(item[0]))
    for index, ((bits, group_size, symmetric, format_name, activations, experts), names) in enumerate(ordered):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            dynamic=False,
            strategy="group" if group_size else "channel",
            group_size=group_size,
        )
        inputs = None
        if activations == "int8":
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")
        targets = [expert_target(names)] if experts else sorted(names)
        schemes[f"group_{index}"] = QuantizationScheme(
            targets=targets,
            weights=args,
            input_activations=inputs,
            format=format_name,
        )
    return schemes


def apply_config(model: Any, layouts: dict[str, IntLayout]) -> None:
    """Attach the compressed-tensors schemes for ``layouts`` to ``model`` (works on a meta-device skeleton)."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    quiet_library_logs()
    modules = dict(model.named_modules())
    ignore = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear) and name not in layouts]
    config = QuantizationConfig(
        config_groups=schemes(layouts),
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=False)


def tied_embedding_name(model: Any, names: Any) -> str | None:
    """The input embedding's name when it is among ``names`` and the output head is tied to it."""
    embedding = model.get_input_embeddings()
    return (
        next((name for name, module in model.named_modules() if module is embedding and name in names), None)
        if is_tied(model)
        else None
    )


def tied_head_name(model: Any, layouts: dict[str, IntLayout]) -> str | None:
    """The tied output head's name when ``layouts`` target it beside the embedding it shares."""
    head = model.get_output_embeddings()
    return (
        next((name for name, module in model.named_modules() if module is head and name in layouts), None)
        if tied_embedding_name(model, layouts)
        else None
    )


def target_layouts(model: Any, layouts: dict[str, IntLayout]) -> dict[str, IntLayout]:
    """``layouts`` plus a tied head on its embedding's 8-bit grid. transformers ties ``lm_head.weight``
    to the embedding's stored int8 ``weight`` before decompressing, so the head must be a quantized
    module too, with its own copy of the scales (vocab × 4 bytes per group): then both decompress to
    the same values. A packed (4-bit) embedding has no ``weight`` to tie; its head is left out and the
    checkpoint is marked ``dequantize`` (see the module docstring)."""
    name = tied_embedding_name(model, layouts)
    if name is None or layouts[name].bits != 8:
        return layouts
    head = model.get_output_embeddings()
    return {**layouts, next(n for n, m in model.named_modules() if m is head): layouts[name]}


def finish_config(folder: Path, model: Any, layouts: dict[str, IntLayout], compute_dtype: Any) -> None:
    """config.json: the dtype the model computes in (so plain transformers reloads what quantcli
    evaluated, whatever 16-bit dtype the kept tensors are stored in), and ``dequantize: true`` when a
    packed embedding is stored (see the module docstring)."""
    embedding = model.get_input_embeddings()
    packed_embedding = any(
        layout.bits < 8 and module is embedding
        for name, module in model.named_modules()
        for layout in [layouts.get(name)]
        if layout
    )
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = str(compute_dtype).removeprefix("torch.")
    if packed_embedding and isinstance(config.get("quantization_config"), dict):
        config["quantization_config"]["dequantize"] = True
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
