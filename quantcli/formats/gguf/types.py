"""Every GGUF type quantcli writes, by name: the legacy block types (:mod:`.legacy`), the K-quants Q4_K and
Q6_K (:mod:`.kquants`) and llama.cpp's mix Q4_K_M; and which type each tensor of a file gets.

Rounding, dequantizing and packing dispatch on the type or record object itself, so one call takes either kind.
:func:`tensor_type` is llama.cpp's choice of each tensor's type for a file type (``--gguf-type``):
the type itself, or for the mix ``Q4_K_M`` its per-tensor rule, then its fallback for widths the
blocks do not fit; the output head (and a tied embedding) as llama.cpp quantizes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, UnavailableError, option
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


_ALL = {**LEGACY, **K_TYPES, "Q4_K_M": Mix("Q4_K_M", 4, "Q4_K")}
TYPES = tuple(LEGACY) + ("Q4_K", "Q6_K", "Q4_K_M")  # every --gguf-type


def block_type(name: str) -> Any:
    """The ``--gguf-type``: a :class:`BlockType`, a K-quant or the ``Q4_K_M`` mix."""
    if name not in TYPES:
        raise InputError(f"{option('gguf_type')} must be one of {', '.join(TYPES)}, got {name!r}.")
    return _ALL[name]


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(
    file_type: Any, name: str, width: int, layers: int, head: bool = False, experts: int = 0
) -> tuple[str, str | None]:
    """The type llama.cpp's quantizer (``llama_tensor_get_type`` in ``src/llama-quant.cpp``, default
    parameters, no imatrix) gives a weight ``name`` (llama.cpp's, e.g. ``blk.3.attn_v.weight``) with
    rows ``width`` wide: ``head`` (the output, or the token embedding tied to it) is Q8_0 when the
    file type is Q8_0 or the width is not a multiple of the file type's block, else Q6_K; in Q4_K_M,
    ``attn_v`` and ``ffn_down`` of the layers ``use_more_bits`` picks are Q6_K; every other weight
    the file type's. Then its ``tensor_type_fallback`` for widths not a multiple of the block:
    Q4_K -> Q5_0, Q6_K -> Q8_0, and F16 below a multiple of 32. A stacked expert tensor
    (``ffn_down_exps``) follows its projection's rule; in a model of exactly 8 ``experts`` (Mixtral's
    count) ``attn_k``/``attn_v`` are Q8_0 and ``attn_output`` Q5_K in Q4_K/Q4_K_M files, as
    llama.cpp's quantizer bumps them. Returns the type and, where it is not the file type's, why."""
    base = file_type.base if isinstance(file_type, Mix) else file_type.name
    block = getattr(_ALL[base], "block", BLOCK)
    chosen = base
    if head:
        chosen = "Q8_0" if base == "Q8_0" or width % block else "Q6_K"
    elif file_type.name == "Q4_K_M" and name.startswith("blk."):
        role, layer = name.split(".")[2].removesuffix("_exps"), int(name.split(".")[1])
        if role == "attn_qkv":
            raise InputError(
                f"{option('gguf_type', 'Q4_K_M')} gives a fused attn_qkv weight (GPT-2) Q5_K, which quantcli does not "
                "write. Use Q4_K or Q6_K."
            )
        if role in ("attn_v", "ffn_down") and _use_more_bits(layer, layers):
            chosen = "Q6_K"
    if experts == 8 and not head and name.startswith("blk."):
        role = name.split(".")[2]
        chosen = "Q8_0" if role in ("attn_k", "attn_v") else chosen
        chosen = "Q5_K" if role == "attn_output" and file_type.name in ("Q4_K", "Q4_K_M") else chosen
        if chosen not in _ALL:
            raise UnavailableError(
                f"llama.cpp's {file_type.name} gives {name} of an 8-expert model {chosen}, which quantcli does not "
                f"write yet. Use {option('gguf_type', 'Q4_0')}, Q8_0 or Q6_K."
            )
    if width % BLOCK:
        return "F16", f"F16, as llama.cpp keeps it: in_features {width} is not a multiple of {BLOCK}"
    notes = [] if chosen == base or head else [f"{chosen}: llama.cpp's {file_type.name} gives this layer more bits"]
    final = chosen
    if width % getattr(_ALL[chosen], "block", BLOCK):
        final = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}[chosen]
        notes.append(f"{final}: llama.cpp's fallback for {chosen}, whose blocks of 256 do not fit in_features {width}")
    return final, "; ".join(notes) or None


def round_to_nearest(matrix: torch.Tensor, kind: Any) -> Any:
    """llama.cpp's reference quantization of ``matrix`` onto ``kind`` (a legacy type or a K-quant)."""
    return kind.round(matrix)


def dequantize(record: Any) -> torch.Tensor:
    """The fp32 ``[out, in]`` values llama.cpp computes with."""
    return record.dequantize()


def pack(record: Any) -> np.ndarray:
    """The type's blocks as ``ggml`` lays them out, ``[out, bytes per row]`` uint8."""
    return record.pack()


def fixed_grid(matrix: torch.Tensor, kind: Any) -> Any:
    """The grid GPTQ rounds onto: :class:`FixedGrid`, or a K-quant's :class:`~quantcli.formats.gguf.kquants.KGrid`."""
    return kind.grid(matrix)


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
