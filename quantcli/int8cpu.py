"""The ``int8-cpu`` backend: run an RTN INT8 checkpoint on CPU with torch's int8 GEMM (fbgemm/x86)
instead of dequantized fp32 weights.

``quantcli.load(DIR, backend="int8-cpu")`` swaps every 8-bit symmetric per-channel layer for
:class:`Int8Linear`: the weights are quantcli's own integers and scales (recovered exactly from the
loaded checkpoint), prepacked once; activations are quantized per token on the fly (dynamic
quantization, ``reduce_range`` as fbgemm needs) and the product is dequantized to fp32. The output
head and non-INT8 layers stay as they are. Opt-in: activation quantization adds a small error, so
``eval`` numbers of the default backend stay those of the stored weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from quantcli.errors import UnavailableError
from quantcli.models import weight_matrix

ENGINES = ("x86", "fbgemm")


def recover_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [out, in], scale [out])`` with ``q * scale == weight`` for RTN INT8 rows.

    A symmetric RTN row's largest magnitude is 127 or 128 steps; the candidate whose rounding
    reproduces the row best is taken (exact for quantcli checkpoints).
    """
    weight = weight.float()
    absmax = weight.abs().amax(dim=1)
    best_q, best_scale, best_error = None, None, None
    for steps in (127.0, 128.0):
        scale = torch.where(absmax > 0, absmax / steps, torch.ones_like(absmax))
        q = torch.round(weight / scale[:, None]).clamp(-128, 127)
        error = (q * scale[:, None] - weight).abs().amax(dim=1)
        if best_error is None:
            best_q, best_scale, best_error = q, scale, error
        else:
            better = error < best_error
            best_q = torch.where(better[:, None], q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.minimum(error, best_error)
    return best_q.to(torch.int8), best_scale


class Int8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with int8 ``W`` (per-channel scales) and dynamically quantized ``x``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated in favour of torchao
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if flat.shape[0] == 1:  # decode: fbgemm's per-tensor activation scale is already per token
            out = torch.ops.quantized.linear_dynamic(flat, self._packed, True)
        else:  # fbgemm quantizes activations per tensor; rows scaled to absmax 1 make that per token
            row_max = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            out = torch.ops.quantized.linear_dynamic(flat / row_max, self._packed, True) * row_max
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def memory_tensors(self) -> list[torch.Tensor]:
        """The packed weight's int8 values and scales, for ``bytes_in_memory``."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return [qweight.int_repr(), qweight.q_per_channel_scales().float()]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, dynamic activations"


def int8_layers(metadata: dict[str, Any] | None) -> list[str]:
    """Layers of a quantcli checkpoint stored as symmetric per-channel 8-bit integers."""
    if not metadata or not (metadata.get("options") or {}).get("symmetric", False):
        return []
    return [name for name, layer in (metadata.get("layers") or {}).items() if layer.get("bits") == 8 and layer.get("scheme") == "channel"]


def convert(model: Any, metadata: dict[str, Any] | None, device: str) -> Any:
    """Swap the INT8 layers of ``model`` (loaded dense from the checkpoint) for :class:`Int8Linear`."""
    names = int8_layers(metadata)
    if not names:
        raise UnavailableError("backend int8-cpu needs a symmetric per-channel INT8 checkpoint (quantcli quantize --method rtn --bits 8). Use --backend auto.")
    if device != "cpu":
        raise UnavailableError(f"backend int8-cpu runs on CPU only, not {device}. Pass --device cpu or use --backend auto.")
    engine = next((e for e in ENGINES if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        raise UnavailableError(f"backend int8-cpu needs torch's x86/fbgemm int8 kernels; this torch has {torch.backends.quantized.supported_engines}. Use --backend auto.")
    torch.backends.quantized.engine = engine
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        q, scale = recover_int8(weight_matrix(module))
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, Int8Linear(q, scale, module.bias))
    return model


