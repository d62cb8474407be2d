"""Writing a compressed-tensors checkpoint from quantcli's integer records (codes, scales, zero points)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.formats import shard_kwargs
from quantcli.formats.compressed_tensors.scheme import (
    apply_config,
    finish_config,
    schemes,
    storage_note,
    target_layouts,
    tied_embedding_name,
    tied_head_name,
)
from quantcli.quant.intgrid import IntWeights
from quantcli.quant.keptdtype import store_kept
from quantcli.quant.records import LayerRecord, QuantizedModel


def compress_layer(layer: IntWeights, held: Any) -> dict[str, Any]:
    """One layer's compressed-tensors tensors (``weight_packed``/``weight``, ``weight_scale``, ...),
    as :func:`save_compressed` writes them, without a model: what streaming writes block by block
    (scales in the layout's dtype, else in ``held``, the dtype the weight was held in)."""
    from compressed_tensors.compressors import BaseCompressor

    from quantcli.quant import ops

    (scheme,) = schemes({"layer": layer.layout}).values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    exact = ops.dequantize(layer.q, layer.scale.float(), layer.zero_point, layer.layout.group_size)
    scale = layer.scale.to(layer.layout.scale_dtype_for(held))
    return compressor.compress({"weight": exact, "weight_scale": scale, "weight_zero_point": layer.zero_point}, scheme)


def save_compressed(
    model: Any,
    weights: dict[str, IntWeights],
    folder: Path,
    max_shard_size: int | None = None,
    kept_dtype: Any = None,
) -> None:
    """Write ``model`` with ``weights``' integers as a compressed-tensors checkpoint (mutates ``model``);
    tensors no integer layer owns are stored in ``kept_dtype`` if given (:mod:`quantcli.quant.keptdtype`).

    The library re-derives each integer as ``round(w / scale + zp)`` from the layer's weight, so
    the weight is set to the exact fp32 dequantized values first (in place: a tied head keeps
    sharing it); that makes it lossless.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor

    from quantcli.quant import ops
    from quantcli.quant.moe import unfuse

    unfuse(model)  # experts are stored one Linear per expert, the layout transformers merges at load
    modules = dict(model.named_modules())
    compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    packable = {name: layer for name, layer in weights.items() if storage_note(modules[name]) is None}
    if not packable:
        if kept_dtype is not None:
            store_kept(model, set(weights), kept_dtype)
        model.save_pretrained(folder, **shard_kwargs(max_shard_size))
        finish_config(folder, model, {}, compute_dtype)
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    layouts = target_layouts(model, {name: layer.layout for name, layer in packable.items()})
    tied, shared = tied_head_name(model, layouts), tied_embedding_name(model, packable)
    apply_config(model, layouts)
    with torch.no_grad():
        for name, layer in packable.items():
            module = modules[name]
            module.weight_scale.data = layer.scale.to(layer.layout.scale_dtype_for(module.weight_scale.dtype))
            if not layer.layout.symmetric:
                module.weight_zero_point.data = layer.zero_point.to(module.weight_zero_point.dtype)
            module.weight.data = ops.dequantize(layer.q, layer.scale.float(), layer.zero_point, layer.layout.group_size)
        if tied:
            head.weight_scale.data = embedding.weight_scale.data.clone()
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    if shared is not None:  # one stored tensor: the embedding's
        head.weight = embedding.weight if tied else None
    if kept_dtype is not None:
        store_kept(model, set(weights) | set(layouts), kept_dtype)
    model.save_pretrained(folder, **shard_kwargs(max_shard_size))
    compressor.update_config(str(folder))
    finish_config(folder, model, layouts, compute_dtype)


def compressed_result(
    model: Any,
    method: str,
    bits: int,
    options: dict[str, Any],
    weights: dict[str, IntWeights],
    notes: dict[str, list[str]],
    stats: dict[str, Any] | None = None,
) -> QuantizedModel:
    """An integer method's result: per-layer records (``notes`` in layer order, plus any storage
    note) and its records, in compressed-tensors, or dense when no layer can be packed."""
    modules = dict(model.named_modules())
    layers = {}
    for name, layer_notes in notes.items():
        layout = weights[name].layout
        note = "; ".join(filter(None, (*layer_notes, storage_note(modules[name]))))
        scheme = "group" if layout.group_size else "channel"
        layers[name] = LayerRecord(layout.bits, scheme, layout.group_size, tuple(weights[name].q.shape), note or None)
    packable = {name: weights[name].layout for name in weights if storage_note(modules[name]) is None}
    for name in set(target_layouts(model, packable)) - set(packable):  # a tied head: the embedding's tensor
        embedding = tied_embedding_name(model, packable)
        tied = layers[embedding]
        layers[name] = LayerRecord(
            8,
            tied.scheme,
            tied.group_size,
            tied.shape,
            f"tied to {embedding}: its int8 tensor, stored once; only the scales are stored again",
        )
    packed_any = any(storage_note(modules[name]) is None for name in weights)
    return QuantizedModel(
        model,
        method,
        bits,
        "compressed-tensors" if packed_any else "dense",
        options,
        layers,
        weights,
        stats or {},
    )
