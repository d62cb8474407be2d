"""bitsandbytes 4-bit checkpoints as transformers writes them: per layer the packed NF4 codes
(``weight``, two per byte, row-major) with ``weight.absmax``, ``weight.quant_map`` and the packed
``weight.quant_state.bitsandbytes__nf4``; ``config.json`` carries a ``BitsAndBytesConfig``. Plain
transformers + bitsandbytes load it with no quantcli installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.formats import Format, register_format
from quantcli.quant.layers import unpack_cpu_4bit

if TYPE_CHECKING:
    import torch

BLOCK = 64  # bitsandbytes' default 4-bit blocksize, which transformers uses


@dataclass
class NF4Weights:
    """One layer in bitsandbytes' NF4 storage: ``codes`` (uint8, ``[out, in]``, one code per weight)
    and the fp32 ``absmax`` of each block of ``BLOCK`` consecutive weights."""

    codes: torch.Tensor
    absmax: torch.Tensor


def pack_nf4(indices: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' storage of 4-bit codes: row-major, two per byte, the first in the high nibble."""
    flat = indices.reshape(-1).to(torch_uint8())
    return (flat[0::2] << 4 | flat[1::2]).reshape(-1, 1)


def torch_uint8() -> Any:
    import torch

    return torch.uint8


@register_format
class Bitsandbytes(Format):
    name = "bitsandbytes"

    def save(self, quantized: Any, folder: Any, max_shard_size: int | None = None) -> None:
        unpack_cpu_4bit(quantized.model)  # bitsandbytes 0.50 saves a CPU-repacked, non-nested absmax transposed
        super().save(quantized, folder, max_shard_size)

    def layer_tensors(self, name: str, record: NF4Weights, module: Any) -> dict[str, Any]:
        import bitsandbytes.functional as F
        import torch

        state = F.QuantState(
            absmax=record.absmax.reshape(-1).float(),
            shape=torch.Size(record.codes.shape),
            code=F.get_4bit_type("nf4", device="cpu"),
            blocksize=BLOCK,
            quant_type="nf4",
            dtype=module.weight.dtype,
        )
        return {
            "weight": pack_nf4(record.codes),
            **{f"weight.{key}": value for key, value in state.as_dict(packed=True).items()},
        }
