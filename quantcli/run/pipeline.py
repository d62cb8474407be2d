"""``quantize``, the library entry point behind ``quantcli quantize``: load → calibrate → quantize →
save atomically → evaluate → report, in memory or streamed (``--low-memory``). ``quantcli eval``'s
entry point is :func:`quantcli.measure.evaluation.evaluate`."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantcli.allocate.run import allocate
from quantcli.checkpoint.atomic import atomic_folder, check_output
from quantcli.checkpoint.conditions import check_not_quantized, check_output_name
from quantcli.checkpoint.inputs import check_inputs_outside, run_inputs
from quantcli.config.honoured import refuse_unhonoured
from quantcli.config.quantize import QuantizeConfig
from quantcli.errors import InputError, ResumableInterrupt, UnavailableError, option
from quantcli.formats import get_format, save
from quantcli.formats.gguf.types import block_type
from quantcli.formats.gguf.writer import check_architecture
from quantcli.measure.evaluation import eval_source, measure_perplexity
from quantcli.measure.perplexity import check_context
from quantcli.methods import capable, default_method, get_method
from quantcli.progress import NullProgress, Progress
from quantcli.quant.activations import quantize_inputs
from quantcli.quant.finite import check_layers_quantizable, check_model_finite
from quantcli.quant.keptdtype import round_kept, storage_dtype
from quantcli.quant.layers import bytes_in_memory, is_conv1d, parameter_count, select_modules
from quantcli.quant.moe import fused_experts, is_expert_layer, refuse, unfuse
from quantcli.quant.records import QuantizeRequest
from quantcli.quant.smoothing import smooth
from quantcli.run.report import QuantizeReport
from quantcli.run.reportfiles import PathResult, write_reports
from quantcli.run.streaming import ShardBlocks
from quantcli.sources.datasets import TextSource, calibration_batch, read_documents
from quantcli.sources.integrity import check_streamed, file_shapes
from quantcli.sources.models import (
    bytes_on_disk,
    check_finite,
    check_vocab,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
    skeleton,
    weight_files,
)


def check_streamable(method: str, device: str) -> None:
    """Refuse, before any work, a streaming run this build cannot do."""
    streaming = capable("streams")
    if method not in streaming:
        raise UnavailableError(
            f"{option('low_memory', True)} works with {option('method')} {' or '.join(streaming)}, not {method}."
        )
    if device != "cpu":
        raise UnavailableError(
            f"{option('low_memory', True)} runs on the CPU; drop {option('device')} or pass {option('device', 'cpu')}."
        )


def default_output(model: str, method: str, bits: int, gguf_type: str | None = None) -> Path:
    return Path(f"{Path(model.rstrip('/')).name}-{method}-{gguf_type or f'w{bits}'}")


@dataclass
class _Run:
    """One quantize run after its options are checked: what both the in-memory and streaming paths need."""

    config: QuantizeConfig
    method_name: str
    method: Any
    method_config: Any
    device: str
    source: str
    progress: Progress
    evaluation: TextSource | None = None
    calibration_text: TextSource | None = None
    grid: Any = None  # the GGUF block type with --format gguf
    timings: dict[str, float] = field(default_factory=dict)


def quantize(config: QuantizeConfig, progress: Progress | None = None, recipe: Path | None = None) -> QuantizeReport:
    """Quantize ``config.model`` and write the checkpoint; returns the report (also saved as report.json).

    The one entry point: ``config.low_memory`` streams the model from disk one decoder block at a
    time (:mod:`quantcli.run.streaming`), otherwise it is loaded whole. Both write through one atomic
    folder with the same metadata, report and gates. ``recipe``, the file ``config`` was read from,
    is protected like the model and datasets: never inside the output folder.
    """
    device = "cpu" if config.low_memory and config.device == "auto" else pick_device(config.device)
    method_name = config.method or ("rtn" if config.allocation else default_method(config.bits, device))
    method = get_method(method_name)
    grid = None
    if config.format == "gguf":
        grid = block_type(config.gguf_type)
    method_config = method.make_config(config.bits, config.method_options, grid)
    refuse_unhonoured(config, method)
    reason = method.unavailable_reason(device)
    if reason:
        raise UnavailableError(f"method {method_name} cannot run on {device} here: {reason}")
    if config.low_memory:
        check_streamable(method_name, device)
    source = resolve_model(config.model)
    output = (
        Path(config.output)
        if config.output
        else default_output(config.model, method_name, config.bits, config.gguf_type)
    )
    check_output_name(output)
    check_not_quantized(source)
    check_inputs_outside(output, run_inputs(config, recipe))
    check_output(output, config.force, source, resume=config.resume)
    evaluation = eval_source(config.eval) if config.eval is not None else None
    calibrates = method.needs_calibration or config.allocation is not None or _smoothing(method_config) is not None
    calibration_text = (
        read_documents(config.calibration.dataset, config.calibration.text_column) if calibrates else None
    )
    run = _Run(
        config,
        method_name,
        method,
        method_config,
        device,
        source,
        progress or NullProgress(),
        evaluation,
        calibration_text,
        grid,
    )
    with atomic_folder(output, config.force, resume=config.resume) as staging:
        result = (_stream if config.low_memory else _in_memory)(run, staging)
        result.tokenizer.save_pretrained(staging)
        report = write_reports(staging, output, config, method_name, device, source, run.timings, result)
    return report


def _original_sizes(source: str, model: Any, skeleton: bool = False) -> dict[str, Any]:
    """Sizes before quantizing; a streaming skeleton's (meta) tensors count at their dtype's size."""
    tensors = [*model.parameters(), *model.buffers()]
    return {
        "disk_bytes": bytes_on_disk(weight_files(source)),
        "memory_bytes": sum(t.numel() * t.element_size() for t in tensors) if skeleton else bytes_in_memory(model),
        "parameters": parameter_count(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _quantizes_tables(run: _Run) -> bool:
    """Whether the input embedding and output head are quantized too (``--embeddings 8`` or ``4``)."""
    return (
        run.method.quantizes_tables
        and run.grid is None
        and run.config.embeddings not in ("keep", None)
        and run.config.bits < 16
    )


def _splits_experts(run: _Run) -> bool:
    """Whether fused experts become one layer per expert (:mod:`quantcli.quant.moe`): integer methods writing
    compressed-tensors; other formats and methods keep them fused, in 16 bits, and say so."""
    return run.method.output_format == "compressed-tensors" and run.grid is None


def _table_bits(config: QuantizeConfig) -> int:
    return config.embeddings if isinstance(config.embeddings, int) else 8


def _kept_dtype(run: _Run, model: Any) -> Any:
    """The 16-bit (or asked) dtype an integer checkpoint stores its unquantized tensors in, or None."""
    if (
        run.method.output_format != "compressed-tensors" or run.grid is not None
    ):  # GGUF keeps norms in F32, as llama.cpp does
        return None

    return storage_dtype(run.config.keep_dtype or "auto", run.source, model)


def _scale_dtype(run: _Run, kept_dtype: Any) -> str | None:
    """What integer layers store their scales in: the kept dtype (``bfloat16``...), rounded before the
    integers are chosen; None (the model's dtype) with a 4-bit embedding, whose checkpoint plain
    transformers decompresses at load in the scales' own dtype (docs/WHOLEMODEL.md)."""
    if kept_dtype is None or (_quantizes_tables(run) and _table_bits(run.config) < 8):
        return None
    return str(kept_dtype).removeprefix("torch.")


def _smoothing(method_config: Any) -> float | None:
    """SmoothQuant's alpha when the run smooths before quantizing (``--smoothing``), else None."""
    return getattr(method_config, "smoothing", None)


def _calibration(run: _Run, tokenizer: Any) -> Any:
    if not run.method.needs_calibration and run.config.allocation is None and _smoothing(run.method_config) is None:
        return None
    start = time.perf_counter()
    with run.progress.task("calibration data", total=None):
        calib = run.config.calibration
        batch = calibration_batch(run.calibration_text, tokenizer, calib.samples, calib.seq_len, calib.seed)
    run.timings["calibration"] = time.perf_counter() - start
    return batch


def _in_memory(run: _Run, staging: Path) -> PathResult:
    """Load the whole model, quantize it, evaluate before/after if asked, and save it into ``staging``."""
    config, progress, timings = run.config, run.progress, run.timings
    start = time.perf_counter()
    with progress.task("load model", total=None):
        tokenizer = load_tokenizer(run.source, config.trust_remote_code)
        model = load_model(
            run.source, pick_dtype(config.dtype, run.device), config.device_map or run.device, config.trust_remote_code
        )
        check_vocab(model, tokenizer, config.model)
        check_finite(model, config.model)
        if run.grid is not None:
            check_architecture(model.config)
        if run.method.needs_calibration or config.allocation is not None:
            check_context(model, config.calibration.seq_len, "calibration.seq_len")
    timings["load"] = time.perf_counter() - start
    if _splits_experts(run):
        unfuse(model)
    selection = select_modules(model, config.skip_modules, tables=_quantizes_tables(run))
    if config.allocation is not None and any(is_expert_layer(name) for name in selection.names):
        raise InputError(
            f"{option('allocation')} cannot mix widths across the experts of a mixture-of-experts model: transformers"
            f" 5.25 decompresses every expert with one scheme at load. Drop {option('allocation')} and pass "
            f"{option('bits')}."
        )
    if config.bits < 16:  # a 16-bit cast has no scale to overflow
        check_layers_quantizable(model, selection.names + selection.tables, config.model)
    kept_dtype = _kept_dtype(run, model)
    original = _original_sizes(run.source, model)
    before = None
    if config.eval is not None:
        start = time.perf_counter()
        before = measure_perplexity(model, tokenizer, config.eval, progress, "original", source=run.evaluation)
        timings["eval_original"] = time.perf_counter() - start
    calibration = _calibration(run, tokenizer)
    smoothed = None
    if _smoothing(run.method_config) is not None:
        start = time.perf_counter()
        with progress.task("smoothing", total=None):
            smoothed = smooth(model, calibration, _smoothing(run.method_config))
        timings["smoothing"] = time.perf_counter() - start

    start = time.perf_counter()
    with progress.task(f"quantize ({run.method_name})", total=len(selection.names)) as advance:
        request = QuantizeRequest(
            run.source,
            model,
            tokenizer,
            selection.names,
            run.device,
            pick_dtype(config.dtype, run.device),
            run.method_config,
            calibration,
            config.trust_remote_code,
            advance,
            config.device_map,
            tables=selection.tables,
            table_bits=_table_bits(config),
            grid=run.grid,
            scale_dtype=_scale_dtype(run, kept_dtype),
        )
        del model
        if config.allocation is not None:
            quantized = allocate(request, run.method_name, config, progress)
        else:
            quantized = run.method.quantize(request)
        if kept_dtype is not None:  # evaluate the values the checkpoint stores
            quantized.kept_dtype = kept_dtype
            round_kept(quantized.model, set(quantized.records), kept_dtype)
        check_model_finite(quantized.model, config.model)
        refuse(quantized.model)  # evaluate with the fused experts plain transformers rebuilds from the checkpoint
        quantize_inputs(quantized, smoothed)
        del request
        gc.collect()
    timings["quantize"] = time.perf_counter() - start

    after = None
    if config.eval is not None:
        start = time.perf_counter()
        after = measure_perplexity(
            quantized.model, tokenizer, config.eval, progress, "quantized", source=run.evaluation
        )
        timings["eval_quantized"] = time.perf_counter() - start
    quantized_memory = bytes_in_memory(quantized.model)
    start = time.perf_counter()
    with progress.task("save", total=None):
        tokenizer.save_pretrained(staging)  # before the weights: a GGUF file carries the tokenizer
        save(quantized, staging, config.max_shard_size)
    timings["save"] = time.perf_counter() - start
    skipped = {
        name: why for name, why in selection.skipped.items() if name not in quantized.layers
    }  # a tied head stored as a layer
    return PathResult(quantized, tokenizer, original, quantized_memory, skipped, calibration, before, after)


def _stream(run: _Run, staging: Path) -> PathResult:
    """Quantize one decoder block at a time from the safetensors shards, writing each into ``staging``."""

    config, progress = run.config, run.progress
    if Path(run.source).is_file():  # resolve_model lets only GGUF files through
        raise InputError(
            f"{option('low_memory', True)} streams safetensors weights, and {run.source} is a GGUF file, which is read "
            f"whole. Drop {option('low_memory', True)}."
        )
    start = time.perf_counter()
    tokenizer = load_tokenizer(run.source, config.trust_remote_code)
    dtype = pick_dtype(config.dtype, run.device)
    model = skeleton(run.source, dtype, config.trust_remote_code)
    if _splits_experts(run):
        unfuse(model)
    elif fused_experts(model):
        raise UnavailableError(
            f"{option('low_memory', True)} streams the experts of a mixture-of-experts model with {option('method')}"
            f" rtn or gptq, not {run.method_name}."
        )
    check_vocab(model, tokenizer, config.model)
    if run.method.needs_calibration:
        check_context(model, config.calibration.seq_len, "calibration.seq_len")
    selection = select_modules(model, config.skip_modules, tables=_quantizes_tables(run))
    kept_dtype = _kept_dtype(run, model)
    if any(is_conv1d(module) for name, module in model.named_modules() if name in selection.names):
        raise UnavailableError(
            f"{option('low_memory', True)} supports models built from Linear layers (Llama, Mistral, Qwen, ...), not "
            "GPT-2's Conv1D."
        )
    original = _original_sizes(run.source, model, skeleton=True)
    calibration = _calibration(run, tokenizer)
    settings = {
        "source": str(Path(run.source).resolve()),
        "method": run.method_name,
        "options": asdict(run.method_config),
        "skip_modules": list(config.skip_modules),
        "dtype": str(dtype),
        "tables": list(selection.tables),
        "table_bits": _table_bits(config),
        "kept_dtype": str(kept_dtype),
        "calibration": vars(config.calibration) if calibration is not None else None,
    }
    blocks = ShardBlocks(
        model,
        selection.names + selection.tables,
        run.source,
        staging,
        settings,
        get_format(run.method.output_format),
        kept_dtype,
    )
    names = {disk: name for name, disk in blocks.disk.items()}  # file names -> the model's
    shapes = {names.get(key, key): shape for key, shape in file_shapes(blocks.where).items()}
    check_streamed(model, shapes, config.model)
    try:
        with progress.task(f"quantize ({run.method_name}) block by block", total=len(selection.names)) as advance:
            request = QuantizeRequest(
                run.source,
                model,
                tokenizer,
                selection.names,
                run.device,
                dtype,
                run.method_config,
                calibration,
                config.trust_remote_code,
                advance,
                blocks=blocks,
                tables=selection.tables,
                table_bits=_table_bits(config),
                scale_dtype=_scale_dtype(run, kept_dtype),
            )
            quantized = run.method.quantize(request)
            blocks.finish()
    except KeyboardInterrupt as error:
        interrupt = ResumableInterrupt(
            f"interrupted after {len(blocks.done)} of {len(blocks.shards)} layer groups; they are kept in {staging}."
            f" Run the same command with {option('resume', True)} to continue."
        )
        interrupt.exit_code = 128 + getattr(error, "signum", 2)  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        raise interrupt from None
    run.timings["quantize"] = time.perf_counter() - start
    quantized.stats.update({"shards": len(blocks.shards), "resumed_shards": blocks.resumed})
    skipped = {name: why for name, why in selection.skipped.items() if name not in quantized.layers}
    return PathResult(quantized, tokenizer, original, original["memory_bytes"], skipped, calibration)
