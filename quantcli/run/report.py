"""The quantize report: sizes, perplexity before/after with their settings, timings, per-layer map."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from quantcli.measure.perplexity import EvalResult
from quantcli.quant.intgrid import PER_CHANNEL, describe_grouping
from quantcli.quant.records import LayerRecord
from quantcli.safetensors_dtypes import tensor_bytes

SIZE_CLASSES = ("embeddings", "head", "quantized_linears", "scales_and_zero_points", "other")
SCALE_TENSORS = ("weight_scale", "weight_zero_point", "weight_global_scale")


def size_breakdown(
    files: list[Any],
    layers: Any,
    embedding: str | None,
    head: str | None,
    parameters: int,
    rename: Any = str,
) -> dict[str, Any]:
    """Bytes of a checkpoint's tensors by class, read from the safetensors headers: the input embedding
    and the output head (their integer codes, or their dense weights when kept), the other quantized
    layers' codes, every scale and zero point, and all else (norms, biases, position embeddings), each
    with the safetensors dtypes it is stored in. ``bits_per_weight`` counts all tensor bytes over all parameters."""
    from safetensors import safe_open

    totals = dict.fromkeys(SIZE_CLASSES, 0)
    dtypes: dict[str, set[str]] = {name: set() for name in SIZE_CLASSES}
    for file in files:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    module, _, kind = rename(key).rpartition(".")  # the model's name for a checkpoint tensor
                    if kind in SCALE_TENSORS:
                        group = "scales_and_zero_points"
                    elif module in (embedding, head):
                        group = "embeddings" if module == embedding else "head"
                    else:
                        group = "quantized_linears" if module in layers else "other"
                    totals[group] += tensor_bytes(handle, key)
                    dtypes[group].add(view.get_dtype())
    total = sum(totals.values())
    return {
        "classes": {
            name: {"bytes": value, "share": value / total if total else 0.0, "dtypes": sorted(dtypes[name])}
            for name, value in totals.items()
        },
        "tensor_bytes": total,
        "bits_per_weight": 8 * total / parameters if parameters else None,
        "embedding": embedding,
        "head": head,
    }


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
    weights: dict[str, Any] = field(default_factory=dict)  # share of matmul weights quantized (quantcli.run.coverage)

    @property
    def tables(self) -> tuple[str, ...]:
        """The input embedding and output head, whichever were quantized (per row, not on the layers' grid)."""
        breakdown = self.size.get("breakdown") or {}
        return tuple(name for name in (breakdown.get("embedding"), breakdown.get("head")) if name in self.layers)

    @property
    def fallbacks(self) -> dict[str, str]:
        """Layers stored differently from the method's default, with the reason."""
        return {name: layer.note for name, layer in self.layers.items() if layer.note and name not in self.tables}

    @property
    def grouping(self) -> dict[str, Any] | None:
        """How rtn/gptq grouped the integer layers, stated once (None for methods without groups)."""
        if "group_size" not in self.options:
            return None

        layers = {
            name: (layer.shape[1], layer.group_size)
            for name, layer in self.layers.items()
            if layer.shape and name not in self.tables
        }
        requested = self.options["group_size"]
        return describe_grouping(None if requested == PER_CHANNEL else requested, layers)

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
