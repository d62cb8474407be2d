"""GGUF, llama.cpp's format: one ``model-TYPE.gguf`` in the output folder, written with the ``gguf``
package llama.cpp publishes (its writer, tensor-name maps, special-vocab reader and quantizers).

The output folder also holds ``quantcli.json``, ``report.json`` and the Hugging Face tokenizer, so
``quantcli eval OUT`` needs no flags; llama.cpp (``llama-cli -m OUT/model-Q4_0.gguf``), ollama and
transformers' GGUF loader read the file alone. Llama-family models, GPT-2, Mixtral (llama.cpp's ``llama``
with experts) and Qwen3-MoE (``qwen3moe``) are written; each expert is rounded as a layer of its own
and the experts of a projection are stored as llama.cpp's stacked ``ffn_*_exps`` tensor
(:mod:`quantcli.formats.gguf.tensors`), the router (``ffn_gate_inp``) F32 as llama.cpp keeps it.

Per-tensor types follow llama.cpp's quantizer (``llama_tensor_get_type``, no imatrix;
:func:`quantcli.formats.gguf.types.tensor_type`): the layers quantcli quantized carry the asked type's
blocks, or Q4_K_M's per-layer choice, or llama.cpp's fallback where the width does not fit (F16
below a multiple of 32); the output head, and the token embedding when it is tied to the head, are
Q6_K, or Q8_0 where the width is not a multiple of 256 or the type is Q8_0; an untied token
embedding gets the layers' type by llama.cpp's reference quantizer; norms, biases, position
embeddings and ``--skip-modules`` layers stay F32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError, UnavailableError
from quantcli.formats import Format, register_format
from quantcli.formats.gguf.metadata import write_hyperparameters, write_tokenizer
from quantcli.formats.gguf.tensors import Packed, dense, tensors
from quantcli.formats.gguf.types import BLOCK, block_type, quantize_layer, tensor_type
from quantcli.quant.layers import weight_matrix
from quantcli.quant.moe import calibration_rule
from quantcli.quant.records import LayerRecord, QuantizedModel
from quantcli.sources import gguf_input
from quantcli.sources.gguf_names import ARCHITECTURES, TensorNames, architecture, expert_count

# general.file_type: the closest llama.cpp names (Q4_K_S is Q4_K with some Q5_K; Q3_K_S, Q5_K_S are all Q3_K, Q5_K)
FILE_TYPES = {"Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}


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


def quantize_on_grid(
    request: Any, method: str, options: dict[str, Any], choose: Any, reference: Any = None
) -> QuantizedModel:
    """Run a method over the request's layers on its GGUF file type (:mod:`quantcli.quant.blockwise`, with
    the request's calibration if any): each layer gets llama.cpp's type for it (:func:`tensor_type`),
    and ``choose(matrix, hessian, kind, name) -> (record, notes)`` rounds layer ``name`` onto that type ``kind``
    (:func:`quantcli.formats.gguf.types.quantize_layer`; F16 layers are not chosen); a layer no
    calibration pass reaches gets a zero Hessian, i.e. rounding, with a note, as does an expert that
    received fewer routed calibration tokens than it has inputs (:func:`quantcli.quant.moe.calibration_rule`).
    A ``reference`` (:class:`quantcli.quant.reference.Reference`) goes to the block driver; with GPTAQ's cross
    term, ``choose(matrix, hessian, kind, name, cross)``."""
    import torch

    from quantcli.quant.blockwise import quantize_blockwise

    modules = dict(request.model.named_modules())
    notes: dict[str, list[str]] = {name: [] for name in request.layers}
    config = request.model.config
    file_type, names, layers = request.grid, TensorNames(request.model), config.num_hidden_layers
    experts = expert_count(config)

    def finish(name: str, hessian: Any, *cross: Any) -> Any:
        width = weight_matrix(modules[name]).shape[1]
        layer_type, note = tensor_type(file_type, names.of_layer(name) or name, width, layers, experts=experts)
        notes[name] += [note] if note else []

        def chosen(matrix: Any) -> Any:
            used = hessian
            under = calibration_rule(name, tokens, matrix.shape[1]) if request.calibration is not None else None
            if request.calibration is not None and (hessian is None or under):
                notes[name].append(
                    under or "round-to-nearest: no calibration pass through the decoder blocks reaches it"
                )
                used = torch.zeros(matrix.shape[1], matrix.shape[1], device=matrix.device)
            record, extra = choose(matrix, used, block_type(layer_type), name, *cross)
            notes[name].extend(extra)
            return record

        record = quantize_layer(modules[name], layer_type, chosen)
        request.progress(1)
        return record

    blocks = request.block_source(request.layers)
    tokens: dict[str, int] = {}  # calibration tokens routed to each expert layer (the experts' rule)
    stats = quantize_blockwise(blocks, request.layers, request.calibration, finish, tokens, reference=reference)
    if "tokens_per_expert" in stats:
        stats["experts_rounded_to_nearest"] = sum(
            1 for name in request.layers if calibration_rule(name, tokens, weight_matrix(modules[name]).shape[1])
        )
    return gguf_result(
        request.model,
        method,
        request.grid,
        options,
        blocks.records,
        notes,
        stats if request.calibration is not None else None,
    )


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
        data, raw_type = dense(module.weight, to_type)
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
    """Refuse a model llama.cpp's graph for its architecture would not compute as transformers does."""
    if config.model_type not in ARCHITECTURES:
        raise UnavailableError(
            f"GGUF output supports Llama-family, GPT-2, Mixtral and Qwen3-MoE models (model_type "
            f"{', '.join(ARCHITECTURES)}), not {config.model_type}."
        )
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise UnavailableError(
            f"GGUF output writes full attention; this model attends through a sliding window of {window} tokens,"
            f" which llama.cpp's {architecture(config)} does not apply."
        )
    differs = {  # what llama.cpp's MoE graphs fix: every layer routed, chosen weights renormalised
        "norm_topk_prob": getattr(config, "norm_topk_prob", True) is not True,
        "mlp_only_layers": bool(getattr(config, "mlp_only_layers", None)),
        "decoder_sparse_step": getattr(config, "decoder_sparse_step", 1) != 1,
    }
    if expert_count(config) and any(differs.values()):
        found = ", ".join(f"{key}={getattr(config, key)!r}" for key, bad in differs.items() if bad)
        raise UnavailableError(
            f"GGUF output writes mixture-of-experts models as llama.cpp computes them: experts in every layer, their"
            f" top-k weights renormalised; this model has {found}."
        )


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
        "refit_scales": "gptq's scale refit is written for the integer grids (compressed-tensors)",
        "awq": "gptq's AWQ pre-step is written for the integer grids (compressed-tensors)",
        "scales": "a GGUF type's scales are llama.cpp's (its scale search); blockround tunes the codes on them",
    }

    def save(self, quantized: QuantizedModel, folder: Path, max_shard_size: int | None = None) -> None:
        """Write ``folder/model-TYPE.gguf``; the tokenizer must already be saved in ``folder``."""
        import gguf

        config = quantized.model.config
        check_architecture(config)
        kind = block_type(quantized.options["gguf_type"])
        writer = gguf.GGUFWriter(str(Path(folder) / f"model-{kind.name}.gguf"), architecture(config))
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
        write_hyperparameters(writer, config, FILE_TYPES.get(kind.name, f"MOSTLY_{kind.name}"))
        write_tokenizer(writer, Path(folder), config.vocab_size)
        for name, data, raw_type in tensors(quantized):
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        import torch

        return gguf_input.load_model(gguf_file(folder), torch.float32, device)
