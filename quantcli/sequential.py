"""Layer-by-layer ("sequential") RTN for models larger than memory, with ``--resume``.

The model is built as a skeleton on the meta device (no weights), so only its shapes and the
compressed-tensors schemes exist in memory. The safetensors shards are then read one decoder layer
at a time (``safe_open``), that layer's Linear weights are quantized with :mod:`quantcli.ops`, and
the layer is written as its own output shard and freed: peak memory is about one layer. The output
is the same compressed-tensors checkpoint the in-memory ``rtn`` method writes, tensor for tensor.

Each finished shard is recorded in ``resume.json`` inside the staging folder; an interrupted run
keeps that folder, and ``--resume`` continues after the last finished layer.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Any

from quantcli import __version__, ops
from quantcli.checkpoint import FORMAT_VERSION, METADATA_FILE, RESUME_FILE, atomic_folder, check_output, write_json
from quantcli.config import QuantizeConfig
from quantcli.errors import InputError, ResumableInterrupt, UnavailableError
from quantcli.finite import check_weight_range
from quantcli.intweights import describe_grouping, plan_layouts
from quantcli.methods import get_method
from quantcli.models import is_conv1d, load_tokenizer, resolve_model, select_modules, weight_matrix
from quantcli.progress import NullProgress, Progress

LAYER = re.compile(r"^(.*?\.(\d+))\.")  # the first numbered module in a path is its decoder block


def source_tensors(source: str) -> dict[str, Path]:
    """Which safetensors file of ``source`` holds each tensor."""
    from safetensors import safe_open

    folder = Path(source)
    if folder.is_file():  # resolve_model lets only GGUF files through
        raise InputError(f"--sequential streams safetensors weights, and {source} is a GGUF file, which is read whole. Drop --sequential.")
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"--sequential streams safetensors weights, and {source} has none. Convert the checkpoint to safetensors first.")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            where.update({key: file for key in handle.keys()})
    return where


def layer_groups(names: list[str]) -> list[list[str]]:
    """Tensor names grouped per decoder layer in layer order, then each other tensor alone (embeddings, norm, head)."""
    layers: dict[int, list[str]] = {}
    rest = []
    for name in sorted(names):
        match = LAYER.match(name)
        layers.setdefault(int(match.group(2)), []).append(name) if match else rest.append(name)
    return [layers[index] for index in sorted(layers)] + [[name] for name in rest]


def _skeleton(source: str, trust_remote_code: bool) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantcli.remote import refuse_remote_code

    refuse_remote_code(source, trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _read(names: list[str], where: dict[str, Path]) -> dict[str, Any]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted({where[name] for name in names}):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in names if where[name] == file})
    return tensors


def _quantize_group(tensors: dict[str, Any], plan: dict[str, Any], modules: dict[str, Any]) -> dict[str, Any]:
    """Replace each planned layer's ``.weight`` by its compressed-tensors form; other tensors pass through."""
    from compressed_tensors.compressors import BaseCompressor

    out = {}
    for key, tensor in tensors.items():
        layer = key.removesuffix(".weight")
        if not key.endswith(".weight") or layer not in plan:
            out[key] = tensor
            continue
        layout = plan[layer]
        check_weight_range(layer, tensor, "")
        scale, zero_point = ops.compute_qparams(tensor, layout.bits, layout.symmetric, layout.group_size, layout.observer)
        q = ops.quantize(tensor, scale, zero_point, layout.bits, layout.group_size)
        exact = ops.dequantize(q, scale.float(), zero_point, layout.group_size)
        scheme = modules[layer].quantization_scheme
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        state = compressor.compress({"weight": exact, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
        out.update({f"{layer}.{name}": value for name, value in state.items()})
    return out


def quantize_sequential(config: QuantizeConfig, progress: Progress | None = None) -> dict[str, Any]:
    """RTN-quantize ``config.model`` one decoder layer at a time; returns a summary of what was written."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantcli.compressed import apply_config

    progress = progress or NullProgress()
    if (config.method or "rtn") != "rtn":
        raise InputError(f"--sequential works with --method rtn only, not {config.method}.")
    if config.max_shard_size is not None:
        raise InputError("--sequential writes one shard per decoder layer; drop --max-shard-size.")
    if config.device not in ("auto", "cpu"):
        raise UnavailableError("--sequential runs on the CPU; drop --device or pass --device cpu.")
    rtn = get_method("rtn").make_config(config.bits, config.method_options)
    source = resolve_model(config.model)
    output = Path(config.output) if config.output else Path(f"{Path(config.model.rstrip('/')).name}-rtn-w{config.bits}")
    check_output(output, config.force, source, resume=config.resume)
    where = source_tensors(source)
    skeleton = _skeleton(source, config.trust_remote_code)
    from quantcli.integrity import check_streamed, file_shapes

    check_streamed(skeleton, file_shapes(where), config.model)
    selection = select_modules(skeleton, config.skip_modules)
    modules = dict(skeleton.named_modules())
    if any(is_conv1d(modules[name]) for name in selection.names):
        raise UnavailableError("--sequential supports models built from Linear layers (Llama, Mistral, Qwen, ...), not GPT-2's Conv1D.")
    plan = plan_layouts(skeleton, selection.names, rtn.bits, rtn.symmetric, rtn.group_size, rtn.observer)
    apply_config(skeleton, plan)
    groups = layer_groups(list(where))
    settings = {"source": str(Path(source).resolve()), "bits": rtn.bits, "group_size": rtn.group_size, "symmetric": rtn.symmetric, "observer": rtn.observer, "skip_modules": list(config.skip_modules)}
    shards = [f"model-{index:05d}-of-{len(groups):05d}.safetensors" for index in range(1, len(groups) + 1)]
    with atomic_folder(output, config.force, resume=config.resume) as staging:
        state = json.loads((staging / RESUME_FILE).read_text()) if (staging / RESUME_FILE).exists() else {}
        done = [shard for shard in state.get("done", []) if (staging / shard).exists()] if state.get("settings") == settings else []
        resumed = len(done)
        write_json(staging / RESUME_FILE, {"settings": settings, "done": done})
        try:
            with progress.task("quantize layer by layer", total=len(groups)) as advance:
                advance(len(done))
                for names, shard in zip(groups, shards):
                    if shard in done:
                        continue
                    tensors = _quantize_group(_read(names, where), plan, modules)
                    save_file(tensors, str(staging / f"{shard}.tmp"), metadata={"format": "pt"})
                    (staging / f"{shard}.tmp").rename(staging / shard)
                    done.append(shard)
                    write_json(staging / RESUME_FILE, {"settings": settings, "done": done})
                    del tensors
                    gc.collect()
                    advance(1)
        except KeyboardInterrupt as error:
            interrupt = ResumableInterrupt(
                f"interrupted after {len(done)} of {len(groups)} layer groups; they are kept in {staging}."
                " Run the same command with --resume to continue."
            )
            interrupt.exit_code = 128 + getattr(error, "signum", 2)  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
            raise interrupt from None
        weight_map, total = {}, 0
        for shard in shards:
            with safe_open(staging / shard, framework="pt") as handle:
                for key in handle.keys():
                    weight_map[key] = shard
                    total += _nbytes(handle, key)
        write_json(staging / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        skeleton.config.save_pretrained(staging)
        if skeleton.can_generate():
            skeleton.generation_config.save_pretrained(staging)
        compressor = ModelCompressor.from_pretrained_model(skeleton)
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        compressor.update_config(str(staging))
        load_tokenizer(source, config.trust_remote_code).save_pretrained(staging)
        layers = {name: {"bits": layout.bits, "scheme": "group" if layout.group_size else "channel", "group_size": layout.group_size, "note": None} for name, layout in plan.items()}
        write_json(staging / METADATA_FILE, {
            "format_version": FORMAT_VERSION, "quantcli_version": __version__, "method": "rtn", "bits": rtn.bits,
            "format": "compressed-tensors", "options": {"group_size": rtn.group_size, "symmetric": rtn.symmetric, "observer": rtn.observer, "sequential": True},
            "source_model": config.model, "layers": layers, "skipped": selection.skipped,
        })
        (staging / RESUME_FILE).unlink()
    grouping = describe_grouping(rtn.group_size, {name: (weight_matrix(modules[name]).shape[1], layout.group_size) for name, layout in plan.items()})
    return {"model": config.model, "output": str(output), "method": "rtn", "bits": rtn.bits, "shards": len(shards), "resumed_shards": resumed, "disk_bytes": total, "grouping": grouping}


def _nbytes(handle: Any, key: str) -> int:
    import math

    view = handle.get_slice(key)
    sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    return math.prod(view.get_shape()) * sizes.get(view.get_dtype(), 4)
