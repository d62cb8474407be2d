"""The layers quantcli quantizes (generic selection: Linear, GPT-2 Conv1D, the input embedding and
output head), reading and writing their weight matrices, and a model's size in memory."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, option

if TYPE_CHECKING:
    import torch

# why an embedding or head stays 16-bit (a layer-map note, result data: it names the flags itself)
TABLE_KEPT = (
    " kept 16-bit (the default for rtn/gptq, the only embedding vLLM serves: --embeddings 8 or 4 quantizes it;"
    " bitsandbytes methods quantize Linear layers only)"
)


@dataclass(frozen=True)
class Selection:
    """Layers chosen for quantization, and those skipped with the reason. ``tables`` are the input
    embedding and an untied output head (``get_input_embeddings``/``get_output_embeddings``), quantized
    per row; a head tied to the embedding is the same tensor, so only the embedding is listed."""

    names: tuple[str, ...]
    skipped: dict[str, str]
    tables: tuple[str, ...] = ()


def is_conv1d(module: Any) -> bool:
    """GPT-2's ``Conv1D`` (weight stored ``[in, out]``), recognised without importing its module."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_tied(model: Any) -> bool:
    """Whether the output head computes with the input embedding's own tensor."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return (
        embedding is not None
        and head is not None
        and getattr(head, "weight", None) is getattr(embedding, "weight", False)
    )


def table_names(model: Any) -> tuple[str | None, str | None]:
    """The names of the input embedding and the output head (None where the model has none)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    found = {id(module): name for name, module in model.named_modules()}
    return found.get(id(embedding)) if embedding is not None else None, found.get(
        id(head)
    ) if head is not None else None


def select_modules(
    model: Any,
    skip_globs: tuple[str, ...] = (),
    include_globs: tuple[str, ...] = ("*",),
    tables: bool = False,
) -> Selection:
    """Linear and Conv1D layers (each expert's, once :func:`quantcli.quant.moe.unfuse` split them) matching
    ``include_globs`` minus ``skip_globs``; with ``tables``, also the input embedding and an untied output
    head (found by ``get_input_embeddings`` and ``get_output_embeddings``, whatever their class), else they
    are kept. Routers and experts left fused are listed as skipped with the reason."""
    import torch

    from quantcli.quant.moe import kept_matmuls

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = is_tied(model)
    modules = dict(model.named_modules())
    embedding_name = next((name for name, module in modules.items() if module is embedding), None)
    names: list[str] = []
    chosen: list[str] = []
    skipped: dict[str, str] = kept_matmuls(model)
    for name, module in modules.items():
        is_table = module is embedding or module is head
        if not (is_table or isinstance(module, torch.nn.Linear) or is_conv1d(module)) or name in skipped:
            continue
        if module is head and tied:
            skipped[name] = f"tied to {embedding_name}: the same tensor, " + (
                "quantized and stored once there" if tables and embedding_name in chosen else "stored once there"
            )
        elif any(fnmatch.fnmatchcase(name, glob) for glob in skip_globs):
            skipped[name] = "matched --skip-modules"
        elif is_table and not tables:
            skipped[name] = f"{'input embedding' if module is embedding else 'output head'}{TABLE_KEPT}"
        elif is_table:
            chosen.append(name)
        elif any(fnmatch.fnmatchcase(name, glob) for glob in include_globs):
            names.append(name)
    for glob in skip_globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in [*names, *chosen, *skipped]):
            raise InputError(
                f"{option('skip_modules')} pattern '{glob}' matches no layer. Layer names look like "
                f"'{(names or list(skipped) or ['?'])[0]}'."
            )
    if not names:
        raise InputError(f"no Linear or Conv1D layer is left to quantize. Loosen {option('skip_modules')}.")
    return Selection(tuple(names), skipped, tuple(chosen))


def weight_matrix(module: Any) -> torch.Tensor:
    """The layer's weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def dense_weight_matrix(module: Any) -> torch.Tensor:
    """The ``[out, in]`` values a layer computes with, dequantizing bitsandbytes' packed storage."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit (Params4bit)
        import bitsandbytes.functional as F

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_4bit(data, copy.copy(state))
        return F.dequantize_4bit(data, state).float()
    if type(module).__name__ == "Linear8bitLt":  # int8 rows with per-row absmax scales
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scales.float()[:, None] / 127
    return weight_matrix(module).float()


def _unpacked_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """Undo the repack bitsandbytes' AVX512-BF16 CPU kernel does at the first forward (codes tiled,
    absmax transposed to bf16). Its own inverse leaves a non-nested absmax transposed; restored here."""
    import bitsandbytes.functional as F

    packed_absmax, kept = state.absmax, getattr(state, "quantcli_nested", None)
    data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
    if kept is not None:  # the exact double-quantized absmax, not bnb's lossy re-quantization of its bf16 copy
        state.absmax, state.state2, state.offset = kept
    elif not state.nested:
        state.absmax = packed_absmax.T.reshape(-1).float()
    return data, state


def keep_nested_4bit_states(model: Any) -> None:
    """Remember each double-quantized 4-bit absmax before the CPU kernel's repack discards it."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "nested", False):
            state.quantcli_nested = (state.absmax, state.state2, state.offset)


def unpack_cpu_4bit(model: Any) -> None:
    """Return every 4-bit weight the CPU kernel repacked to bitsandbytes' portable layout (before saving)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _unpacked_4bit(weight.data, weight.quant_state)


def set_weight_matrix(module: Any, matrix: torch.Tensor) -> None:
    """Write ``[out, in]`` values back in the layer's own layout and dtype."""
    values = matrix.t() if is_conv1d(module) else matrix
    module.weight.data.copy_(values.to(module.weight.dtype))


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _quantization_tensors(module: Any) -> list[Any]:
    """Tensors bitsandbytes keeps outside parameters: 4-bit quant state, int8 row scales."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    tensors = []
    if state is not None:  # the CPU kernel's repacked state has no state2 (absmax dequantized to bf16)
        nested = getattr(state, "state2", None)
        tensors += [
            state.absmax,
            state.code,
            *([nested.absmax, nested.code, state.offset] if nested is not None else []),
        ]
    scb = getattr(getattr(module, "weight", None), "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return [*tensors, scb]


def _held_tensors(tensor: Any) -> list[Any]:
    """The plain tensors that hold ``tensor``'s bytes: itself, or the inner tensors of a wrapper
    subclass (torchao's, quanto's: their own numel and dtype are the dense weight's, not what they store)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [held for name in names for held in _held_tensors(getattr(tensor, name)) if held is not None]


def bytes_in_memory(model: Any) -> int:
    """Bytes of every distinct parameter, buffer and bitsandbytes quantization state (tied weights once);
    a tensor subclass (torchao, quanto) counts the tensors it holds."""
    import torch

    seen: set[tuple[int, int, int]] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += _quantization_tensors(module)
    for tensor in (held for owner in tensors if torch.is_tensor(owner) for held in _held_tensors(owner)):
        if tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
