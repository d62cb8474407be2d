"""Every tensor of a quantized model as the GGUF file stores it: ``(llama.cpp name, data, raw type)``.

Names come from :class:`quantcli.sources.gguf_names.TensorNames`. A quantized layer is its record's
blocks; a fused experts parameter is one stacked tensor per projection (``ffn_gate_exps``...,
``[experts, rows, bytes per row]``: each expert's record packed as a dense layer's, stacked as
llama.cpp's converter stacks them). llama's q/k rows are permuted to llama.cpp's rotary layout, as its
converter does. Norms, biases, routers (``ffn_gate_inp``, as llama.cpp keeps them) and layers no
method quantized stay F32; a quantized layer whose width no block fits is F16.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from quantcli.errors import UnavailableError
from quantcli.formats.gguf.types import LEGACY, block_type, pack, round_to_nearest
from quantcli.quant.layers import is_conv1d
from quantcli.quant.records import QuantizedModel
from quantcli.sources.gguf_names import TensorNames


@dataclass
class Packed:
    """A tensor already in the file's layout: ``data`` (numpy) of ggml type ``raw_type`` (None: F32/F16 by dtype)."""

    data: Any
    raw_type: Any


def permute_rows(tensor: Any, heads: int) -> Any:
    """Llama's q/k rows from Hugging Face's rotary layout (halves) to llama.cpp's (pairs)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def dense(value: Any, to_type: str) -> tuple[Any, Any]:
    """A dense tensor as ``(numpy data, raw type)``: F32/F16 as is, a block type by llama.cpp's
    reference quantizer (``gguf``'s for the legacy types, :mod:`quantcli.formats.gguf.kquants`')."""
    import gguf
    import numpy as np

    array = value.detach().float().cpu().numpy()
    if to_type == "F32":
        return array.astype(np.float32), None
    if to_type == "F16":
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType[to_type]
    if to_type in LEGACY:
        return gguf.quants.quantize(array, kind), kind
    return pack(round_to_nearest(value.detach().float().cpu(), block_type(to_type))), kind


def _record(record: Any, heads: int | None) -> tuple[Any, Any]:
    import gguf

    if heads:
        record = replace(
            record,
            **{
                f.name: permute_rows(getattr(record, f.name), heads)
                for f in fields(record)
                if f.name != "type" and getattr(record, f.name) is not None
            },
        )
    return pack(record), gguf.GGMLQuantizationType[record.type.name]


def _stacked(quantized: QuantizedModel, module: str, part: str, values: Any) -> tuple[Any, Any]:
    """One projection of every expert of fused ``module`` as one ``[experts, rows, ...]`` tensor;
    ``values``: the projection's fused values, for experts stored dense."""
    import numpy as np

    names = [f"{module}.{index}.{part}" for index in range(values.shape[0])]
    records = [quantized.records.get(name) for name in names]
    if all(record is not None for record in records):
        packed = [_record(record, None) for record in records]
        return np.stack([data for data, _ in packed]), packed[0][1]
    return dense(values, "F16" if any(name in quantized.layers for name in names) else "F32")


def tensors(quantized: QuantizedModel) -> Iterator[tuple[str, Any, Any]]:
    """``(gguf name, data, raw type)`` of every tensor, in the model's order."""
    model, config = quantized.model, quantized.model.config
    names = TensorNames(model)
    modules = dict(model.named_modules())
    tied = getattr(config, "tie_word_embeddings", False)
    for key, value in model.state_dict().items():
        module_name = key.rsplit(".", 1)[0]
        parts = names.parts(key)
        if parts is not None:
            for (part, name), values in zip(parts, value.chunk(len(parts), dim=1)):
                if name is None:
                    raise UnavailableError(f"GGUF output has no llama.cpp name for the {part} experts of {key}.")
                yield (name, *_stacked(quantized, module_name, part, values))
            continue
        name = names.of(key)
        if name is None:
            raise UnavailableError(
                f"GGUF output has no llama.cpp name for tensor {key} of this {config.model_type} model."
            )
        if name == "output.weight" and tied:
            continue
        heads = None
        if names.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if name.endswith("attn_q.weight") else config.num_key_value_heads
        record = quantized.records.get(module_name) if key.endswith(".weight") else None
        if isinstance(record, Packed):
            yield name, record.data, record.raw_type
            continue
        if record is not None:
            yield (name, *_record(record, heads))
            continue
        if key.endswith(".weight") and is_conv1d(modules[module_name]):
            value = value.t()
        if heads:
            value = permute_rows(value, heads)
        to_type = (
            "F16" if module_name in quantized.layers and key.endswith(".weight") else "F32"
        )  # F16: blocks cannot hold it
        yield (name, *dense(value, to_type))
