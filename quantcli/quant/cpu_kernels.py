"""Weight-only integer kernels on CPU: ``--backend int8-cpu`` and ``--backend int4-cpu``.

``quantcli.load(DIR, backend=...)`` swaps the integer layers of a quantcli checkpoint for modules
that keep the checkpoint's own integers packed in memory and multiply with torch's weight-only
kernels: ``torch._weight_int8pack_mm`` (8-bit, symmetric, per channel) and
``torch._weight_int4pack_mm_for_cpu`` (4- and 3-bit, symmetric or asymmetric, groups of 32-256).
Activations are not quantized, so the layer computes the stored weights' function; the kernels run
fast on CPU only with bfloat16 activations, so inputs and outputs are rounded to bfloat16 inside
the layer (about 3 significant digits; stories260K and SmolLM2 perplexity change < 0.1%, see tests).
The int8 kernel gets unit scales and the fp32 channel scales are applied to its output; the int4
kernel takes bfloat16 ``(scale, zero)`` pairs per group and row.

The integers come from the dense model loaded from the checkpoint and the checkpoint's stored
``weight_scale`` (``n = round(w / scale)``, i.e. ``q - zero_point``), or, for layers stored dense
(GPT-2 Conv1D), from the weights alone (symmetric rows whose largest step is ``qmax`` or ``-qmin``).
Every layer's integers are checked to reproduce its weights; layers a kernel cannot take (shape,
grouping, asymmetric 8-bit) stay dense and are listed in ``model.cpu_kernels_dense``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantcli.errors import UnavailableError, option
from quantcli.quant.layers import weight_matrix
from quantcli.quant.ops import int_range

BACKEND_BITS = {"int8-cpu": (8,), "int4-cpu": (4, 3)}
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 CPU kernel accepts


class _WeightOnlyLinear(torch.nn.Module):
    """Shared shape handling: bfloat16 into the kernel, the input's dtype out, bias in fp32."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x.reshape(-1, self.in_features).to(torch.bfloat16))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """``y = (x @ q.T) * scale + b`` with int8 ``q`` ``[out, in]`` and fp32 per-channel ``scale``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(q.shape[1], q.shape[0], bias)
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).contiguous())
        self.register_buffer("_unit", torch.ones(q.shape[0], dtype=torch.bfloat16), persistent=False)

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(flat, self.q, self._unit).float() * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, per channel"


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """``y = x @ W.T + b`` with ``W = (u - 8) * scale + zero`` per group, ``u`` 4-bit unsigned, packed."""

    def __init__(
        self,
        unsigned: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__(unsigned.shape[1], unsigned.shape[0], bias)
        self.group_size = group_size
        self.register_buffer(
            "packed", torch._convert_weight_to_int4pack_for_cpu(unsigned.to(torch.int32).contiguous(), 1)
        )
        pairs = torch.stack([scale.float().t(), zero.float().t()], dim=-1)  # [groups, out, 2]
        self.register_buffer("scale_and_zero", pairs.to(torch.bfloat16).contiguous())

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_and_zero).float()

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int4 weight-only, packed, groups of {self.group_size}"


def recover_symmetric(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Per-group scales ``[out, groups]`` of symmetric RTN weights stored dense: a group's largest
    magnitude is ``qmax`` or ``-qmin`` steps, or (the ``signed`` observer) exactly ``qmin`` steps with a
    signed scale; the candidate that reproduces the group best wins."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, -1, group_size or in_features)
    absmax = groups.abs().amax(dim=-1)
    signed = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    qmin, qmax = int_range(bits)
    best_scale, best_error = None, None
    for top in (absmax / qmax, absmax / -qmin, signed / qmin):
        scale = torch.where(absmax > 0, top, torch.ones_like(absmax))
        q = torch.round(groups / scale[..., None]).clamp(qmin, qmax)
        error = (q * scale[..., None] - groups).abs().amax(dim=-1)
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            best_scale = torch.where(error < best_error, scale, best_scale)
            best_error = torch.minimum(error, best_error)
    return best_scale


def _stored_scales(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """``weight_scale`` of each layer in ``names`` that the checkpoint stores (any shard)."""
    from safetensors import safe_open

    wanted = {f"{name}.weight_scale": name for name in names}
    scales = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in wanted.keys() & set(handle.keys()):
                scales[wanted[key]] = handle.get_tensor(key)
    return scales


def _steps(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``round(w / scale)`` per group (``[out, in]``, int32), or None if it does not reproduce ``w``."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, scale.shape[1], -1)
    scale = scale.float()[..., None]
    steps = torch.round(groups / scale)
    tolerance = 0.01 * scale.abs() + 2 * torch.finfo(weight.dtype).eps * groups.abs()  # weights stored in 16 bits round
    if ((steps * scale - groups).abs() > tolerance).any():
        return None
    return steps.reshape(out_features, in_features).to(torch.int32)


def _int8_module(steps: torch.Tensor, scale: torch.Tensor, bias: Any) -> Any:
    """An int8 kernel layer, or why it cannot be one."""
    if scale.shape[1] != 1:
        return "int8 kernel is per channel; this layer has groups"
    if steps.min() < -128 or steps.max() > 127:
        return "int8 kernel has no zero point; this layer is asymmetric"
    if steps.shape[1] % 16:
        return f"int8 kernel needs in_features divisible by 16, got {steps.shape[1]}"
    return Int8WeightOnlyLinear(steps.to(torch.int8), scale[:, 0], bias)


def _int4_module(steps: torch.Tensor, scale: torch.Tensor, bias: Any) -> Any:
    """An int4 kernel layer (groups split to a size the kernel takes), or why it cannot be one."""
    out_features, in_features = steps.shape
    group = in_features // scale.shape[1]
    kernel_group = next((size for size in INT4_GROUPS if group % size == 0), None)
    if kernel_group is None:
        return f"int4 kernel takes groups of 32-256 dividing in_features, got groups of {group}"
    if out_features % 16:
        return f"int4 kernel needs out_features divisible by 16, got {out_features}"
    scale = scale.float().repeat_interleave(group // kernel_group, dim=1)
    grouped = steps.reshape(out_features, -1, kernel_group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    offset = torch.where((low >= -8) & (high <= 7), torch.full_like(low, 8), -low)  # u = n + offset in [0, 15]
    if (high + offset > 15).any():
        return "its integers span more than 4 bits"
    unsigned = (grouped + offset[..., None]).reshape(out_features, in_features)
    return Int4WeightOnlyLinear(unsigned, scale, (8 - offset).float() * scale, kernel_group, bias)


def kernel_layers(
    backend: str, metadata: dict[str, Any] | None, tables: set[str], device: str
) -> dict[str, dict[str, Any]]:
    """The checkpoint's layers ``backend`` runs, from its metadata (``tables``, its embedding and head, stay
    dequantized:
    an Embedding is no matmul); raises before any model loads
    when the backend cannot run here or the checkpoint has no such layers."""
    bits = BACKEND_BITS[backend]
    layers = {
        name: layer
        for name, layer in ((metadata or {}).get("layers") or {}).items()
        if layer.get("bits") in bits and name not in tables
    }
    if not layers:
        stored = (metadata or {}).get("bits")
        other = next((name for name, b in BACKEND_BITS.items() if stored in b), None)
        hint = (
            f"This checkpoint is {stored}-bit: use {option('backend', other)}."
            if other
            else f"Use {option('backend', 'auto')}."
        )
        raise UnavailableError(
            f"backend {backend} runs quantcli rtn/gptq checkpoints of {'/'.join(map(str, bits))} bits. {hint}"
        )
    if device != "cpu":
        raise UnavailableError(
            f"backend {backend} runs on CPU only, not {device}. Pass {option('device', 'cpu')} or use "
            f"{option('backend', 'auto')}."
        )
    needed = "_weight_int8pack_mm" if backend == "int8-cpu" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch, needed):
        raise UnavailableError(
            f"backend {backend} needs torch.{needed} (torch >= 2.6); this is torch {torch.__version__}. Upgrade torch "
            f"or use {option('backend', 'auto')}."
        )
    return layers


def convert(model: Any, layers: dict[str, dict[str, Any]], folder: str | Path, backend: str) -> Any:
    """Swap ``layers`` of ``model`` (loaded dense from ``folder``) for weight-only kernel layers."""
    modules = dict(model.named_modules())
    scales = _stored_scales(Path(folder), list(layers))
    dense: dict[str, str] = {}
    for name, layer in layers.items():
        module = modules[name]
        matrix = weight_matrix(module)
        scale = scales.get(name)
        if scale is None:
            scale = recover_symmetric(matrix, layer["bits"], layer.get("group_size"))
        steps = _steps(matrix, scale.reshape(matrix.shape[0], -1))
        if steps is None:
            dense[name] = "its integers could not be recovered from the checkpoint"
            continue
        built = (_int8_module if backend == "int8-cpu" else _int4_module)(
            steps, scale.reshape(matrix.shape[0], -1), module.bias
        )
        if isinstance(built, str):
            dense[name] = built
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, built)
    if len(dense) == len(layers):
        raise UnavailableError(
            f"backend {backend} can run none of this checkpoint's layers ({next(iter(dense.values()))}). Use "
            f"{option('backend', 'auto')}."
        )
    model.cpu_kernels_dense = dense
    return model
