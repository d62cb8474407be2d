"""GGUF, llama.cpp's format: one ``model-TYPE.gguf`` in the output folder, written with the ``gguf``
package llama.cpp publishes (its writer, tensor-name maps, special-vocab reader and quantizers).

The output folder also holds ``quantcli.json``, ``report.json`` and the Hugging Face tokenizer, so
``quantcli eval OUT`` needs no flags; llama.cpp (``llama-cli -m OUT/model-Q4_0.gguf``), ollama and
transformers' GGUF loader read the file alone. Llama-family models and GPT-2 are written.

Per-tensor types follow llama.cpp's quantizer (``llama_tensor_get_type``, no imatrix;
:func:`quantcli.formats.gguf.types.tensor_type`): the layers quantcli quantized carry the asked type's
blocks, or Q4_K_M's per-layer choice, or llama.cpp's fallback where the width does not fit (F16
below a multiple of 32); the output head, and the token embedding when it is tied to the head, are
Q6_K, or Q8_0 where the width is not a multiple of 256 or the type is Q8_0; an untied token
embedding gets the layers' type by llama.cpp's reference quantizer; norms, biases, position
embeddings and ``--skip-modules`` layers stay F32.
Llama's q/k rows are permuted to llama.cpp's rotary layout, as its converter does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError, UnavailableError
from quantcli.formats import Format, register_format
from quantcli.formats.gguf.metadata import write_hyperparameters, write_tokenizer
from quantcli.formats.gguf.types import BLOCK, LEGACY, block_type, pack, quantize_layer, round_to_nearest, tensor_type
from quantcli.quant.layers import is_conv1d, weight_matrix
from quantcli.quant.records import LayerRecord, QuantizedModel
from quantcli.sources import gguf_input

ARCHITECTURES = ("llama", "gpt2")  # model_type -> gguf.MODEL_ARCH of the same name
FILE_TYPES = {"Q4_K": "MOSTLY_Q4_K_S"}  # general.file_type: the closest llama.cpp names (Q4_K_S is Q4_K with some Q5_K)


def gguf_result(
    model: Any,
    method: str,
    kind: Any,
    options: dict[str, Any],
    records: dict[str, Any],
    notes: dict[str, list[str]],
    stats: dict[str, Any] | None = None,
) -> QuantizedModel:
    """A method's result on a GGUF grid: one record per layer (None: stored F16) and the per-layer map."""
    modules = dict(model.named_modules())
    layers = {}
    for name, layer_notes in notes.items():
        record = records.get(name)
        shape = tuple(weight_matrix(modules[name]).shape)
        bits, scheme = (record.type.bits, record.type.name) if record is not None else (16, "F16")
        group = getattr(record.type, "sub", BLOCK) if record is not None else None
        layers[name] = LayerRecord(bits, scheme, group, shape, "; ".join(layer_notes) or None)
    return QuantizedModel(
        model, method, kind.bits, "gguf", options, layers, {**records, **_embeddings(model, kind)}, stats or {}
    )


def _llamacpp_names(model: Any) -> Any:
    import gguf

    config = model.config
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[config.model_type.upper()], config.num_hidden_layers)


def quantize_on_grid(
    request: Any, method: str, options: dict[str, Any], choose: Any, reference: Any = None
) -> QuantizedModel:
    """Run a method over the request's layers on its GGUF file type (:mod:`quantcli.quant.blockwise`, with
    the request's calibration if any): each layer gets llama.cpp's type for it (:func:`tensor_type`),
    and ``choose(matrix, hessian, kind) -> (record, notes)`` rounds it onto that type ``kind``
    (:func:`quantcli.formats.gguf.types.quantize_layer`; F16 layers are not chosen); a layer no
    calibration pass reaches gets a zero Hessian, i.e. rounding, with a note. A ``reference``
    (:class:`quantcli.quant.reference.Reference`) goes to the block driver; with GPTAQ's cross term,
    ``choose(matrix, hessian, kind, cross)``."""
    import torch

    from quantcli.quant.blockwise import quantize_blockwise

    modules = dict(request.model.named_modules())
    notes: dict[str, list[str]] = {name: [] for name in request.layers}
    file_type, names, layers = request.grid, _llamacpp_names(request.model), request.model.config.num_hidden_layers

    def finish(name: str, hessian: Any, *cross: Any) -> Any:
        width = weight_matrix(modules[name]).shape[1]
        layer_type, note = tensor_type(
            file_type, names.get_name(f"{name}.weight", try_suffixes=(".weight",)) or name, width, layers
        )
        notes[name] += [note] if note else []

        def chosen(matrix: Any) -> Any:
            used = hessian
            if request.calibration is not None and hessian is None:
                notes[name].append("round-to-nearest: no calibration pass through the decoder blocks reaches it")
                used = torch.zeros(matrix.shape[1], matrix.shape[1], device=matrix.device)
            record, extra = choose(matrix, used, block_type(layer_type), *cross)
            notes[name].extend(extra)
            return record

        record = quantize_layer(modules[name], layer_type, chosen)
        request.progress(1)
        return record

    blocks = request.block_source(request.layers)
    stats = quantize_blockwise(blocks, request.layers, request.calibration, finish, reference=reference)
    return gguf_result(
        request.model,
        method,
        request.grid,
        options,
        blocks.records,
        notes,
        stats if request.calibration is not None else None,
    )


@dataclass
class Packed:
    """A tensor already in the file's layout: ``data`` (numpy) of ggml type ``raw_type`` (None: F32/F16 by dtype)."""

    data: Any
    raw_type: Any


def _embeddings(model: Any, kind: Any) -> dict[str, Packed]:
    """The token embedding and output head in the types the file stores them (see above), their
    weights set to those values so that the model quantcli measures is the file's."""
    import gguf
    import numpy as np
    import torch

    modules = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is embedding.weight
    layers, width = model.config.num_hidden_layers, embedding.weight.shape[1]
    head_type = tensor_type(kind, "output.weight", width, layers, head=True)[0]
    chosen = {
        embedding: head_type if tied else tensor_type(kind, "token_embd.weight", width, layers)[0],
        **({} if tied else {head: head_type}),
    }
    packed = {}
    for module, to_type in chosen.items():
        data, raw_type = _dense(module.weight, to_type)
        values = gguf.quants.dequantize(data, raw_type) if raw_type is not None else data.astype(np.float32)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(values).to(module.weight.dtype))
        packed[modules[module]] = Packed(data, raw_type)
    return packed


def gguf_file(folder: str | Path) -> Path:
    """The one ``.gguf`` file of a quantcli GGUF output folder."""
    found = sorted(Path(folder).glob("*.gguf"))
    if len(found) != 1:
        raise CheckpointError(
            f"{folder} should hold exactly one .gguf file, found {len(found)}. Re-run quantcli quantize."
        )
    return found[0]


def check_architecture(config: Any) -> None:
    if config.model_type not in ARCHITECTURES:
        raise UnavailableError(
            f"GGUF output supports Llama-family and GPT-2 models (model_type llama, gpt2), not {config.model_type}."
        )


def _permute_rows(tensor: Any, heads: int) -> Any:
    """Llama's q/k rows from Hugging Face's rotary layout (halves) to llama.cpp's (pairs)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def _dense(value: Any, to_type: str) -> tuple[Any, Any]:
    """A dense tensor as ``(numpy data, raw type)``: F32/F16 as is, a block type by llama.cpp's
    reference quantizer (``gguf``'s for the legacy types, :mod:`quantcli.formats.gguf.kquants`')."""
    import gguf
    import numpy as np

    array = value.detach().float().cpu().numpy()
    if to_type == "F32":
        return array.astype(np.float32), None
    if to_type == "F16":
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType[to_type]
    if to_type in LEGACY:
        return gguf.quants.quantize(array, kind), kind
    return pack(round_to_nearest(value.detach().float().cpu(), block_type(to_type))), kind


def _tensors(quantized: QuantizedModel) -> Any:
    """``(gguf name, data, raw type)`` of every tensor, in the model's order."""
    import gguf

    model, config = quantized.model, quantized.model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[config.model_type.upper()], config.num_hidden_layers)
    modules = dict(model.named_modules())
    tied = getattr(config, "tie_word_embeddings", False)
    for key, value in model.state_dict().items():
        module_name = key.rsplit(".", 1)[0]
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnavailableError(
                f"GGUF output has no llama.cpp name for tensor {key} of this {config.model_type} model."
            )
        if name == "output.weight" and tied:
            continue
        heads = None
        if config.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if name.endswith("attn_q.weight") else config.num_key_value_heads
        record = quantized.records.get(module_name) if key.endswith(".weight") else None
        if isinstance(record, Packed):
            yield name, record.data, record.raw_type
            continue
        if record is not None:
            if heads:
                record = replace(
                    record,
                    **{
                        f.name: _permute_rows(getattr(record, f.name), heads)
                        for f in fields(record)
                        if f.name != "type" and getattr(record, f.name) is not None
                    },
                )
            yield name, pack(record), gguf.GGMLQuantizationType[record.type.name]
            continue
        if key.endswith(".weight") and is_conv1d(modules[module_name]):
            value = value.t()
        if heads:
            value = _permute_rows(value, heads)
        to_type = (
            "F16" if module_name in quantized.layers and key.endswith(".weight") else "F32"
        )  # F16: blocks cannot hold it
        yield (name, *_dense(value, to_type))


@register_format
class GGUF(Format):
    name = "gguf"
    fixed_options = {
        "group_size": "a GGUF type fixes its block size (32 weights; 256 for the K types)",
        "symmetric": "a GGUF type fixes whether its blocks have an offset"
        " (Q4_1, Q5_1, Q4_K do; Q4_0, Q5_0, Q8_0, Q6_K do not)",
        "observer": "each block's scale is the GGUF type's own (llama.cpp's reference rounding)",
        "embeddings": "llama.cpp's rules pick the token embedding's and output head's types",
        "keep_dtype": "GGUF stores norms and other unquantized vectors in F32, as llama.cpp does",
    }

    def save(self, quantized: QuantizedModel, folder: Path, max_shard_size: int | None = None) -> None:
        """Write ``folder/model-TYPE.gguf``; the tokenizer must already be saved in ``folder``."""
        import gguf

        config = quantized.model.config
        check_architecture(config)
        kind = block_type(quantized.options["gguf_type"])
        writer = gguf.GGUFWriter(str(Path(folder) / f"model-{kind.name}.gguf"), config.model_type)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
        write_hyperparameters(writer, config, FILE_TYPES.get(kind.name, f"MOSTLY_{kind.name}"))
        write_tokenizer(writer, Path(folder), config.vocab_size)
        for name, data, raw_type in _tensors(quantized):
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        import torch

        return gguf_input.load_model(gguf_file(folder), torch.float32, device)
