"""Every GGUF type quantcli writes, by name: the legacy block types (:mod:`.legacy`), the K-quants Q3_K,
Q4_K, Q5_K and Q6_K (:mod:`.kquants`) and llama.cpp's mixes Q3_K_M, Q4_K_M and Q5_K_M; and which type each
tensor of a file gets.

Rounding, dequantizing and packing dispatch on the type or record object itself, so one call takes either kind.
:func:`tensor_type` is llama.cpp's choice of each tensor's type for a file type (``--gguf-type``):
the type itself, or for a mix its per-tensor rule, then its fallback for widths the
blocks do not fit; the output head (and a tied embedding) as llama.cpp quantizes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, option
from quantcli.formats.gguf.kquants import K_TYPES
from quantcli.formats.gguf.legacy import BLOCK, LEGACY, BlockType, BlockWeights, FixedGrid
from quantcli.quant.layers import set_weight_matrix, weight_matrix

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "BLOCK",
    "LEGACY",
    "TYPES",
    "BlockType",
    "BlockWeights",
    "FixedGrid",
    "Mix",
    "block_type",
    "dequantize",
    "fixed_grid",
    "pack",
    "quantize_layer",
    "round_to_nearest",
    "tensor_type",
]


@dataclass(frozen=True)
class Mix:
    """A file type of several block types: ``base`` where llama.cpp's rule picks no other (``Q4_K_M``)."""

    name: str
    bits: int
    base: str


MIXES = {"Q3_K_M": Mix("Q3_K_M", 3, "Q3_K"), "Q4_K_M": Mix("Q4_K_M", 4, "Q4_K"), "Q5_K_M": Mix("Q5_K_M", 5, "Q5_K")}
_ALL = {**LEGACY, **K_TYPES, **MIXES}
TYPES = tuple(LEGACY) + tuple(K_TYPES) + tuple(MIXES)  # every --gguf-type
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's tensor_type_fallback


def block_type(name: str) -> Any:
    """The ``--gguf-type``: a :class:`BlockType`, a K-quant or a mix."""
    if name not in TYPES:
        raise InputError(f"{option('gguf_type')} must be one of {', '.join(TYPES)}, got {name!r}.")
    return _ALL[name]


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _mix_rule(mix: str, role: str, layer: int, layers: int) -> str | None:
    """``llama_tensor_get_type``'s choice for a decoder weight in a mix (a dense model, not Falcon, default
    parameters, no imatrix), None where it keeps the mix's base type. Q3_K_M: ``attn_v`` Q5_K in layers 0-1,
    else Q4_K; ``ffn_down`` Q5_K in the first sixteenth of the layers, else Q4_K; ``attn_output`` and a fused
    ``attn_qkv`` Q4_K. Q4_K_M/Q5_K_M: ``attn_v`` and ``ffn_down`` Q6_K where ``use_more_bits``; ``attn_qkv``
    Q5_K/Q6_K."""
    if mix == "Q3_K_M":
        return {
            "attn_v": "Q5_K" if layer < 2 else "Q4_K",
            "ffn_down": "Q5_K" if layer < layers // 16 else "Q4_K",
            "attn_output": "Q4_K",
            "attn_qkv": "Q4_K",
        }.get(role)
    if role == "attn_qkv":
        return "Q5_K" if mix == "Q4_K_M" else "Q6_K"
    if role in ("attn_v", "ffn_down") and _use_more_bits(layer, layers):
        return "Q6_K"
    return None


def tensor_type(
    file_type: Any, name: str, width: int, layers: int, head: bool = False, experts: int = 0
) -> tuple[str, str | None]:
    """The type llama.cpp's quantizer (``llama_tensor_get_type`` in ``src/llama-quant.cpp``, default
    parameters, no imatrix) gives a weight ``name`` (llama.cpp's, e.g. ``blk.3.attn_v.weight``) with
    rows ``width`` wide: ``head`` (the output, or the token embedding tied to it) is Q8_0 when the
    file type is Q8_0 or the width is not a multiple of the file type's block, else Q6_K; in a mix,
    :func:`_mix_rule`'s; every other weight the file type's. Then its ``tensor_type_fallback`` for widths
    not a multiple of the block (:data:`FALLBACK`), and F16 below a multiple of 32. A stacked expert tensor
    (``ffn_down_exps``) follows its projection's rule; in a model of exactly 8 ``experts`` (Mixtral's count)
    ``attn_k``/``attn_v`` are Q8_0 and ``attn_output`` Q5_K in Q3_K/Q4_K files and mixes, as llama.cpp's
    quantizer bumps them. Returns the type and, where it is not the file type's, why."""
    base = file_type.base if isinstance(file_type, Mix) else file_type.name
    block = getattr(_ALL[base], "block", BLOCK)
    chosen = base
    if head:
        chosen = "Q8_0" if base == "Q8_0" or width % block else "Q6_K"
    elif isinstance(file_type, Mix) and name.startswith("blk."):
        role, layer = name.split(".")[2].removesuffix("_exps"), int(name.split(".")[1])
        chosen = _mix_rule(file_type.name, role, layer, layers) or base
    if experts == 8 and not head and name.startswith("blk."):
        role = name.split(".")[2]
        chosen = "Q8_0" if role in ("attn_k", "attn_v") else chosen
        chosen = "Q5_K" if role == "attn_output" and base in ("Q3_K", "Q4_K") else chosen
    if width % BLOCK:
        return "F16", f"F16, as llama.cpp keeps it: in_features {width} is not a multiple of {BLOCK}"
    notes = [] if chosen == base or head else [f"{chosen}: llama.cpp's {file_type.name} gives this layer more bits"]
    final = chosen
    if width % getattr(_ALL[chosen], "block", BLOCK):
        final = FALLBACK[chosen]
        notes.append(f"{final}: llama.cpp's fallback for {chosen}, whose blocks of 256 do not fit in_features {width}")
    return final, "; ".join(notes) or None


def round_to_nearest(matrix: torch.Tensor, kind: Any, importance: torch.Tensor | None = None) -> Any:
    """llama.cpp's quantization of ``matrix`` onto ``kind`` (a legacy type or a K-quant): its reference
    quantizer, or with ``importance`` (``[in]``, an imatrix) its imatrix quantizer."""
    return kind.round(matrix, importance)


def dequantize(record: Any) -> torch.Tensor:
    """The fp32 ``[out, in]`` values llama.cpp computes with."""
    return record.dequantize()


def pack(record: Any) -> np.ndarray:
    """The type's blocks as ``ggml`` lays them out, ``[out, bytes per row]`` uint8."""
    return record.pack()


def fixed_grid(matrix: torch.Tensor, kind: Any, importance: torch.Tensor | None = None) -> Any:
    """The grid GPTQ rounds onto: :class:`FixedGrid`, or a K-quant's :class:`~quantcli.formats.gguf.kquants.KGrid`,
    its scales llama.cpp's from ``matrix`` (and ``importance``, as :func:`round_to_nearest`)."""
    return kind.grid(matrix, importance)


def quantize_layer(module: Any, type_name: str, choose: Callable[[torch.Tensor], Any]) -> Any:
    """One layer onto the grid of ``type_name`` (:func:`tensor_type`'s) with ``choose(matrix)``
    (rounding or GPTQ); its weights become the values llama.cpp will compute with. ``F16`` (a width
    not a multiple of 32, as llama.cpp's quantizer keeps it): no record, its weights rounded to fp16."""
    matrix = weight_matrix(module)
    if type_name == "F16":
        set_weight_matrix(module, matrix.half().float())
        return None
    record = choose(matrix)
    set_weight_matrix(module, dequantize(record).to(matrix.device))
    return record
