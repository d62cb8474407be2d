"""Plain dense weights (``cast`` to fp16/bf16, or integer layers that cannot be packed): what
``from_pretrained`` reads with no quantization config."""

from __future__ import annotations

from typing import Any

from quantcli.formats import Format, register_format


@register_format
class Dense(Format):
    name = "dense"

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        from quantcli.sources.models import load_model

        return load_model(folder, "auto", device, trust_remote_code)
