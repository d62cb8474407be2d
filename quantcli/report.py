"""The quantize report: sizes, perplexity before/after with their settings, timings, per-layer map."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from quantcli.perplexity import EvalResult
from quantcli.methods.base import LayerRecord


def size_summary(original: dict[str, Any], quantized_disk: int, quantized_memory: int) -> dict[str, Any]:
    """Bytes on disk and in memory before/after, bits per weight over all parameters, ratios."""
    parameters = original["parameters"]
    return {
        "parameters": parameters,
        "original_dtype": original["dtype"],
        "original_disk_bytes": original["disk_bytes"],
        "quantized_disk_bytes": quantized_disk,
        "original_memory_bytes": original["memory_bytes"],
        "quantized_memory_bytes": quantized_memory,
        "original_bits_per_weight": 8 * original["memory_bytes"] / parameters,
        "quantized_bits_per_weight": 8 * quantized_disk / parameters,
        "disk_ratio": original["disk_bytes"] / quantized_disk if quantized_disk and original["disk_bytes"] else None,
        "memory_ratio": original["memory_bytes"] / quantized_memory if quantized_memory else None,
    }


@dataclass
class QuantizeReport:
    schema_version: int
    quantcli_version: str
    model: str
    output: str
    method: str
    bits: int
    format: str
    device: str
    options: dict[str, Any]
    recipe: dict[str, Any]
    calibration: dict[str, Any] | None
    size: dict[str, Any]
    perplexity_before: EvalResult | None
    perplexity_after: EvalResult | None
    timings: dict[str, float]
    layers: dict[str, LayerRecord]
    skipped: dict[str, str]
    stats: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fallbacks(self) -> dict[str, str]:
        """Layers stored differently from the method's default, with the reason."""
        return {name: layer.note for name, layer in self.layers.items() if layer.note}

    @property
    def grouping(self) -> dict[str, Any] | None:
        """How rtn/gptq grouped the integer layers, stated once (None for methods without groups)."""
        if "group_size" not in self.options:
            return None
        from quantcli.intweights import describe_grouping

        return describe_grouping(self.options["group_size"], {name: (layer.shape[1], layer.group_size) for name, layer in self.layers.items() if layer.shape})

    @property
    def perplexity_delta(self) -> dict[str, float] | None:
        if not (self.perplexity_before and self.perplexity_after):
            return None
        before, after = self.perplexity_before.perplexity, self.perplexity_after.perplexity
        return {"absolute": after - before, "percent": 100 * (after - before) / before}

    def to_dict(self) -> dict[str, Any]:
        data = {key: (asdict(value) if is_dataclass(value) else value) for key, value in vars(self).items()}
        data["layers"] = {name: asdict(layer) for name, layer in self.layers.items()}
        data["perplexity_delta"] = self.perplexity_delta
        data["fallbacks"] = self.fallbacks
        data["grouping"] = self.grouping
        return data
