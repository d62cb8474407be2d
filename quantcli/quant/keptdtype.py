"""The dtype of tensors an integer checkpoint leaves unquantized: norms, biases, a kept embedding/head.

An fp32 source would otherwise store them in fp32, which for a kept 49,152 × 576 embedding is
113 MB, two thirds of a 4-bit SmolLM2. ``--keep-dtype auto`` (the default) stores them in 16 bits:
the source config's own dtype when that is 16-bit (the dtype the model was published in, so nothing
is rounded that the authors did not already round), else bfloat16, which has fp32's exponent range
and so cannot overflow where fp16 (largest value 65,504) could. ``float32`` keeps fp32; ``bfloat16``
and ``float16`` force one. Integer layers' scales are stored in the same dtype, rounded before the
integers are chosen (:func:`quantcli.quant.ops.compute_qparams`), except with a 4-bit embedding (see
``pipeline._scale_dtype``).

The values are rounded in the model in memory too, so the perplexity quantcli measures is that of
the checkpoint it writes; the model keeps computing in its own dtype (config.json keeps it, so plain
transformers reloads exactly these values).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SIXTEEN_BIT = ("float16", "bfloat16")


def source_dtype(source: str) -> str | None:
    """The dtype a local model folder's config.json declares (``dtype`` or the older ``torch_dtype``)."""
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def storage_dtype(choice: str, source: str, model: Any) -> Any:
    """The torch dtype kept tensors are stored in, or None when that is the dtype the model holds."""
    import torch

    held = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if choice == "auto":
        if held != torch.float32:
            return None
        declared = source_dtype(source)
        choice = declared if declared in SIXTEEN_BIT else "bfloat16"
    dtype = getattr(torch, choice)
    return None if dtype == held else dtype


def kept_tensors(model: Any, quantized: set[str]) -> Iterator[tuple[str, Any]]:
    """``(name, parameter)`` of every floating-point parameter no integer layer owns: a quantized layer's
    weight (and its scales) are its own, its bias is not. A tied tensor is yielded once."""
    modules = dict(model.named_modules())
    seen = {id(p) for name in quantized for key, p in modules[name].named_parameters(recurse=False) if key != "bias"}
    for module_name, module in modules.items():
        for key, parameter in module.named_parameters(recurse=False):
            if parameter is not None and parameter.is_floating_point() and id(parameter) not in seen:
                seen.add(id(parameter))
                yield f"{module_name}.{key}" if module_name else key, parameter


def round_kept(model: Any, quantized: set[str], dtype: Any) -> None:
    """Round every kept tensor to ``dtype`` in place, keeping the model's dtype (see the module docstring)."""
    for _, parameter in kept_tensors(model, quantized):
        parameter.data = parameter.data.to(dtype).to(parameter.dtype)


def store_kept(model: Any, quantized: set[str], dtype: Any) -> None:
    """Cast every kept tensor to ``dtype`` (just before saving)."""
    for _, parameter in kept_tensors(model, quantized):
        parameter.data = parameter.data.to(dtype)
