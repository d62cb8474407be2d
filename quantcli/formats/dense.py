"""Plain dense weights (``cast`` to fp16/bf16, or integer layers that cannot be packed): what
``from_pretrained`` reads with no quantization config."""

from __future__ import annotations

from typing import Any

from quantcli.formats import Format, register_format
from quantcli.quant.keptdtype import store_kept
from quantcli.sources.models import load_model


@register_format
class Dense(Format):
    name = "dense"

    def save(self, quantized: Any, folder: Any, max_shard_size: int | None = None) -> None:
        """As transformers saves it, with the tensors no record owns in the run's kept dtype (an allocation
        that keeps every layer is priced in it: the bytes on disk are the predicted ones)."""
        if quantized.kept_dtype is not None:
            store_kept(quantized.model, set(quantized.records), quantized.kept_dtype)
        super().save(quantized, folder, max_shard_size)

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        return load_model(folder, "auto", device, trust_remote_code)
