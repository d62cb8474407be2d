"""compressed-tensors checkpoints (the format llm-compressor writes and vLLM serves), written and
read through the ``compressed-tensors`` library with quantcli's own integers injected.

Weight-only layers are stored ``pack-quantized`` (int32 words) at every width, W8A8 layers and an
8-bit embedding/head ``int-quantized`` (plain int8): see :func:`storage_kind`. Symmetric checkpoints
reload with plain ``AutoModelForCausalLM.from_pretrained``.
Asymmetric 3/4-bit ones are valid but transformers 5.23 + compressed-tensors 0.20 cannot build
them (packed zero point vs unpacked skeleton; llm-compressor#1618), so :func:`load_compressed`
decompresses with the library's own compressors instead, which reads every variant.
GPT-2's ``Conv1D`` cannot be packed by compressed-tensors: such layers are written dense.

The input embedding (an ``Embedding``, targeted by name) and an untied head are quantized like any
layer; a tied head is the embedding's tensor, stored once (the head's own entry is dropped and
transformers re-ties it). transformers 5.24's default compressed route cannot build either a tied
quantized embedding (the head would be tied to the int8/packed tensor) or a packed ``Embedding``
(its weight initialiser reads ``.weight``), so such checkpoints set ``dequantize: true`` in their
quantization config: plain ``from_pretrained`` then decompresses every layer at load with
compressed-tensors' own decompressors, the same values. vLLM (CPU 0.32.0, checked) serves neither a
quantized embedding nor head: its config rejects the int8 ``int-quantized`` group without input
activations, and its Llama loader has no ``embed_tokens.weight_packed``; so they are kept by default
(docs/VLLM.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError
from quantcli.formats import Format, register_format
from quantcli.intweights import IntLayout, IntWeights
from quantcli.methods.base import LayerRecord, QuantizedModel, shard_kwargs
from quantcli.layers import is_conv1d

CONV1D_NOTE = "stored dense (fake-quantized): compressed-tensors cannot pack GPT-2 Conv1D"


def _quiet_library_logs() -> None:
    from loguru import logger

    logger.disable("compressed_tensors")


def storage_note(module: Any) -> str | None:
    """Why a layer's integers cannot be stored packed, or None when they can."""
    return CONV1D_NOTE if is_conv1d(module) else None


def storage_kind(layout: IntLayout) -> str:
    """The compressed-tensors format one layer is stored in, as vLLM's scheme selection reads it
    (vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py, 0.32):

    - W8A8 (``activations="int8"``): ``int-quantized`` with dynamic per-token int8 input activations,
      which vLLM serves as ``CompressedTensorsW8A8Int8`` (CPU: ``CPUInt8ScaledMMLinearKernel``);
    - weight-only linears at every width, 8 bits included: ``pack-quantized`` (int32 words), the one
      weight-only format vLLM's ``CompressedTensorsWNA16`` takes, and what compressed-tensors' own
      ``infer_module_format`` picks for llm-compressor's W8A16 preset (``int-quantized`` only with
      input activations). vLLM rejects an ``int-quantized`` group without input activations unless its
      weights are floats (its config asserts it), so plain int8 weight-only cannot be served;
    - an 8-bit embedding/head (``--embeddings 8``, which vLLM cannot serve anyway): ``int-quantized``,
      whose plain ``weight`` transformers ties the head to.
    """
    if layout.activations is not None or (layout.bits == 8 and layout.table):
        return "int-quantized"
    return "pack-quantized"


def _schemes(layouts: dict[str, IntLayout]) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, layout in layouts.items():
        key = (layout.bits, layout.group_size, layout.symmetric, storage_kind(layout), layout.activations)
        groups.setdefault(key, []).append(name)
    schemes = {}
    for index, ((bits, group_size, symmetric, format_name, activations), names) in enumerate(
        sorted(groups.items(), key=lambda item: str(item[0]))
    ):
        args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
            strategy="group" if group_size else "channel", group_size=group_size,
        )
        inputs = None
        if activations == "int8":
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")
        schemes[f"group_{index}"] = QuantizationScheme(
            targets=sorted(names), weights=args, input_activations=inputs, format=format_name,
        )
    return schemes


def apply_config(model: Any, layouts: dict[str, IntLayout]) -> None:
    """Attach the compressed-tensors schemes for ``layouts`` to ``model`` (works on a meta-device skeleton)."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    _quiet_library_logs()
    modules = dict(model.named_modules())
    ignore = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear) and name not in layouts]
    config = QuantizationConfig(
        config_groups=_schemes(layouts), ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=False)


def compress_layer(layer: IntWeights, held: Any) -> dict[str, Any]:
    """One layer's compressed-tensors tensors (``weight_packed``/``weight``, ``weight_scale``, ...),
    as :func:`save_compressed` writes them, without a model: what streaming writes block by block
    (scales in the layout's dtype, else in ``held``, the dtype the weight was held in)."""
    from compressed_tensors.compressors import BaseCompressor

    from quantcli import ops

    (scheme,) = _schemes({"layer": layer.layout}).values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    exact = ops.dequantize(layer.q, layer.scale.float(), layer.zero_point, layer.layout.group_size)
    scale = layer.scale.to(layer.layout.scale_dtype_for(held))
    return compressor.compress({"weight": exact, "weight_scale": scale, "weight_zero_point": layer.zero_point}, scheme)


def save_compressed(
    model: Any, weights: dict[str, IntWeights], folder: Path, max_shard_size: int | None = None, kept_dtype: Any = None,
) -> None:
    """Write ``model`` with ``weights``' integers as a compressed-tensors checkpoint (mutates ``model``);
    tensors no integer layer owns are stored in ``kept_dtype`` if given (:mod:`quantcli.keptdtype`).

    The library re-derives each integer as ``round(w / scale + zp)`` from the layer's weight, so
    the weight is set to the exact fp32 dequantized values first (in place: a tied head keeps
    sharing it); that makes it lossless.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor

    from quantcli import ops
    from quantcli.keptdtype import store_kept

    modules = dict(model.named_modules())
    compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    packable = {name: layer for name, layer in weights.items() if storage_note(modules[name]) is None}
    if not packable:
        if kept_dtype is not None:
            store_kept(model, set(weights), kept_dtype)
        model.save_pretrained(folder, **shard_kwargs(max_shard_size))
        _finish_config(folder, model, {}, compute_dtype)
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
    _finish_config(folder, model, layouts, compute_dtype)


def tied_embedding_name(model: Any, names: Any) -> str | None:
    """The input embedding's name when it is among ``names`` and the output head is tied to it."""
    from quantcli.layers import is_tied

    embedding = model.get_input_embeddings()
    return next((name for name, module in model.named_modules() if module is embedding and name in names), None) if is_tied(model) else None


def tied_head_name(model: Any, layouts: dict[str, IntLayout]) -> str | None:
    """The tied output head's name when ``layouts`` target it beside the embedding it shares."""
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head and name in layouts), None) if tied_embedding_name(model, layouts) else None


def target_layouts(model: Any, layouts: dict[str, IntLayout]) -> dict[str, IntLayout]:
    """``layouts`` plus a tied head on its embedding's 8-bit grid. transformers ties ``lm_head.weight``
    to the embedding's stored int8 ``weight`` before decompressing, so the head must be a quantized
    module too, with its own copy of the scales (vocab × 4 bytes per group): then both decompress to
    the same values. A packed (4-bit) embedding has no ``weight`` to tie; its head is left out and the
    checkpoint is marked ``dequantize`` (see the module docstring)."""
    name = tied_embedding_name(model, layouts)
    if name is None or layouts[name].bits != 8:
        return layouts
    head = model.get_output_embeddings()
    return {**layouts, next(n for n, m in model.named_modules() if m is head): layouts[name]}


def _finish_config(folder: Path, model: Any, layouts: dict[str, IntLayout], compute_dtype: Any) -> None:
    """config.json: the dtype the model computes in (so plain transformers reloads what quantcli
    evaluated, whatever 16-bit dtype the kept tensors are stored in), and ``dequantize: true`` when a
    packed embedding is stored (see the module docstring)."""
    embedding = model.get_input_embeddings()
    packed_embedding = any(layout.bits < 8 and module is embedding for name, module in model.named_modules() for layout in [layouts.get(name)] if layout)
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = str(compute_dtype).removeprefix("torch.")
    if packed_embedding and isinstance(config.get("quantization_config"), dict):
        config["quantization_config"]["dequantize"] = True
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def compressed_result(
    model: Any, method: str, bits: int, options: dict[str, Any], weights: dict[str, IntWeights],
    notes: dict[str, list[str]], stats: dict[str, Any] | None = None,
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
        layers[name] = LayerRecord(8, tied.scheme, tied.group_size, tied.shape, f"tied to {embedding}: its int8 tensor, stored once; only the scales are stored again")
    packed_any = any(storage_note(modules[name]) is None for name in weights)
    return QuantizedModel(
        model, method, bits, "compressed-tensors" if packed_any else "dense", options, layers, weights, stats or {},
    )


def _dense_state_dict(
    folder: Path, quantization_config: dict[str, Any], dtype: Any, modules: dict[str, Any], tied_head: str | None = None,
) -> dict[str, Any]:
    """Every tensor of ``folder``, quantized layers decompressed with their scheme's own compressor
    (schemes target layers by name or by class, e.g. ``Linear``, as llm-compressor writes them)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    config = QuantizationConfig.model_validate(quantization_config)
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    prefixes = {key.rsplit(".", 1)[0] for key in state if key.endswith((".weight_packed", ".weight_scale"))}
    dense: dict[str, Any] = {}
    for prefix in sorted(prefixes):
        module = modules.get(prefix)
        scheme = next((s for s in config.config_groups.values() if module is not None and is_match(prefix, module, s.targets)), None)
        if scheme is None:
            raise CheckpointError(f"{folder}: layer {prefix} has quantized tensors but no scheme in config.json. The checkpoint is corrupt; re-run quantcli quantize.")
        local = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.rsplit(".", 1)[0] == prefix}
        if prefix == tied_head and "weight" not in local:  # its int8 tensor is the embedding's: tie_weights() gives it
            continue
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        local = {key: value.to(dtype) if key == "weight_scale" else value for key, value in local.items()}  # 16-bit scales: multiply in the model's dtype, as transformers does
        dense[prefix + ".weight"] = compressor.decompress(local, scheme)["weight"].to(dtype)
    dense.update({key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items() if key.rsplit(".", 1)[0] not in prefixes})
    return dense


def load_compressed(folder: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """A dense, runnable model from a compressed-tensors checkpoint, decompressed by the library."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_library_logs()
    folder = Path(folder)
    from quantcli.remote import refuse_remote_code

    refuse_remote_code(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        raise CheckpointError(f"{folder}/config.json has no quantization_config: not a compressed-tensors checkpoint.")
    del config.quantization_config
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    head = next((name for name, module in model.named_modules() if module is model.get_output_embeddings()), None)
    tied_head = head if config.tie_word_embeddings else None
    state = _dense_state_dict(folder, quantization if isinstance(quantization, dict) else quantization.to_dict(), dtype, dict(model.named_modules()), tied_head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name + ".weight" for name, module in model.named_modules() if module is model.get_output_embeddings()}
    if unexpected or set(missing) - (tied if config.tie_word_embeddings else set()):
        raise CheckpointError(f"{folder}: weights do not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}). The checkpoint is corrupt or truncated.")
    model.tie_weights()
    _quantize_inputs(model, quantization if isinstance(quantization, dict) else quantization.to_dict())
    return model.to(device).eval()


def _quantize_inputs(model: Any, quantization_config: dict[str, Any]) -> None:
    """W8A8 checkpoints: the layers whose scheme quantizes their inputs per token get them quantized
    at run time (:mod:`quantcli.activations`), as vLLM does when it serves them."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    from quantcli.activations import attach, is_int8_token_dynamic

    config = QuantizationConfig.model_validate(quantization_config)
    schemes = [scheme for scheme in config.config_groups.values() if is_int8_token_dynamic(scheme.input_activations)]
    if schemes:
        modules = model.named_modules()
        names = [name for name, module in modules if any(is_match(name, module, s.targets) for s in schemes)]
        attach(model, [name for name in names if name not in set(config.ignore or [])])


@register_format
class CompressedTensors(Format):
    """Integer layers (:class:`IntWeights`) as compressed-tensors ``pack-quantized``/``int-quantized``
    (:func:`storage_kind`)."""

    name = "compressed-tensors"

    def layer_tensors(self, name: str, record: IntWeights, module: Any) -> dict[str, Any]:
        return compress_layer(record, module.weight.dtype)

    def tied_tensors(self, model: Any, name: str, stored: dict[str, Any]) -> dict[str, Any]:
        head = tied_head_name(model, target_layouts(model, {name: IntLayout(8, True, None)})) if "weight" in stored else None
        return {f"{head}.weight_scale": stored["weight_scale"].clone()} if head else {}

    def finish(self, model: Any, records: dict[str, IntWeights], folder: Path) -> None:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationStatus

        layouts = target_layouts(model, {name: record.layout for name, record in records.items()})
        apply_config(model, layouts)
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        compressor.update_config(str(folder))
        _finish_config(folder, model, layouts, next(p.dtype for p in model.parameters() if p.is_floating_point()))

    def save(self, quantized: QuantizedModel, folder: Path, max_shard_size: int | None = None) -> None:
        save_compressed(quantized.model, quantized.records, folder, max_shard_size, quantized.kept_dtype)

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        return load_compressed(folder, device)
