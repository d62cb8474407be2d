"""Plain dense weights (``cast`` to fp16/bf16, or integer layers that cannot be packed): what
``from_pretrained`` reads with no quantization config."""

from __future__ import annotations

import json
from pathlib import Path
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
        if quantized.kept_dtype is not None and quantized.records:
            _load_as_stored_widest(Path(folder), quantized.model)


def _load_as_stored_widest(folder: Path, model: Any) -> None:
    """Layers that could not be packed (GPT-2's Conv1D) are stored dense in their own, wider dtype, but
    transformers names the first parameter's (the 16-bit embedding's) in config.json and casts every
    tensor to it at load, moving those weights off their grid: name the widest stored dtype instead, to
    which the 16-bit tensors upcast exactly."""
    widest = max((p.dtype for p in model.parameters() if p.is_floating_point()), key=lambda d: d.itemsize)
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = str(widest).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        return load_model(folder, "auto", device, trust_remote_code)
