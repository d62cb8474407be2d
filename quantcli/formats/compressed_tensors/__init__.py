"""compressed-tensors checkpoints (the format llm-compressor writes and vLLM serves), written and
read through the ``compressed-tensors`` library with quantcli's own integers injected.

Weight-only layers are stored ``pack-quantized`` (int32 words) at every width, W8A8 layers and an
8-bit embedding/head ``int-quantized`` (plain int8): see :func:`storage_kind`. Symmetric checkpoints
reload with plain ``AutoModelForCausalLM.from_pretrained``.
Asymmetric 3/4-bit ones are valid but transformers 5.23 + compressed-tensors 0.20 cannot build
them (packed zero point vs unpacked skeleton; llm-compressor#1618), so :func:`load_compressed`
decompresses with the library's own compressors instead, which reads every variant.
GPT-2's ``Conv1D`` cannot be packed so that plain transformers 5.25 reloads it: such layers are
written dense, with a note and the report's warning (``--format gguf`` packs GPT-2). compressed-tensors
could store a ``[in, out]`` weight in ``block`` strategy ``[group, 1]`` (groups along inputs, as here),
but transformers' default route gives quantization slots to ``Linear``/``Embedding`` only, and its
``dequantize: true`` route decompresses every non-expert layer with the first config group's scheme
(``get_dense_scheme``), so the int8 embedding beside int4 Conv1D layers would be decompressed wrongly.

Mixture-of-experts models are written one Linear per expert (:mod:`quantcli.quant.moe`): the per-expert
names transformers merges into its fused parameters at load and vLLM's MoE loader reads. The experts
are one config group with a ``re:`` target naming ``experts`` (transformers picks the experts' scheme by
that, one scheme for all experts: :func:`quantcli.quant.intgrid.plan_layouts` gives them one grid) and keep
their scales in the model's dtype (transformers leaves experts it dequantizes in the scales' dtype).

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

from pathlib import Path
from typing import Any

from quantcli.formats import Format, register_format
from quantcli.formats.compressed_tensors.reader import load_compressed
from quantcli.formats.compressed_tensors.scheme import apply_config, finish_config, target_layouts, tied_head_name
from quantcli.formats.compressed_tensors.writer import compress_layer, save_compressed
from quantcli.quant.intgrid import IntLayout, IntWeights
from quantcli.quant.records import QuantizedModel


@register_format
class CompressedTensors(Format):
    """Integer layers (:class:`IntWeights`) as compressed-tensors ``pack-quantized``/``int-quantized``
    (:func:`.scheme.storage_kind`)."""

    name = "compressed-tensors"

    def layer_tensors(self, name: str, record: IntWeights, module: Any) -> dict[str, Any]:
        return compress_layer(record, module.weight.dtype)

    def tied_tensors(self, model: Any, name: str, stored: dict[str, Any]) -> dict[str, Any]:
        head = (
            tied_head_name(model, target_layouts(model, {name: IntLayout(8, True, None)}))
            if "weight" in stored
            else None
        )
        return {f"{head}.weight_scale": stored["weight_scale"].clone()} if head else {}

    def finish(self, model: Any, records: dict[str, IntWeights], folder: Path) -> None:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationStatus

        layouts = target_layouts(model, {name: record.layout for name, record in records.items()})
        apply_config(model, layouts)
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        compressor.update_config(str(folder))
        finish_config(folder, model, layouts, next(p.dtype for p in model.parameters() if p.is_floating_point()))

    def save(self, quantized: QuantizedModel, folder: Path, max_shard_size: int | None = None) -> None:
        save_compressed(quantized.model, quantized.records, folder, max_shard_size, quantized.kept_dtype)

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        return load_compressed(folder, device)
