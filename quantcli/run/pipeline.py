"""``quantize``, the library entry point behind ``quantcli quantize``: load → calibrate → quantize →
save atomically → evaluate → report, in memory or streamed (``--low-memory``). ``quantcli eval``'s
entry point is :func:`quantcli.measure.evaluation.evaluate`."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from quantcli.allocate.run import allocate
from quantcli.checkpoint.atomic import atomic_folder, check_output
from quantcli.checkpoint.conditions import check_not_quantized, check_output_name
from quantcli.checkpoint.inputs import check_inputs_outside, run_inputs
from quantcli.config.honoured import refuse_unhonoured
from quantcli.config.quantize import QuantizeConfig
from quantcli.errors import InputError, UnavailableError, option
from quantcli.formats import save
from quantcli.formats.gguf.types import block_type
from quantcli.formats.gguf.writer import check_architecture
from quantcli.measure.evaluation import eval_source, measure_perplexity
from quantcli.measure.perplexity import check_context
from quantcli.methods import default_method, get_method
from quantcli.progress import NullProgress, Progress
from quantcli.quant.activations import quantize_inputs
from quantcli.quant.finite import check_layers_quantizable, check_model_finite
from quantcli.quant.keptdtype import round_kept
from quantcli.quant.layers import bytes_in_memory, select_modules
from quantcli.quant.moe import is_expert_layer, refuse, unfuse
from quantcli.quant.smoothing import smooth
from quantcli.run.plan import (
    Run,
    calibration_for,
    check_streamable,
    default_output,
    kept_dtype_for,
    original_sizes,
    quantize_request,
    quantizes_tables,
    smoothing_alpha,
    splits_experts,
)
from quantcli.run.report import QuantizeReport
from quantcli.run.reportfiles import PathResult, write_reports
from quantcli.run.streamed import quantize_streamed
from quantcli.sources.datasets import read_documents
from quantcli.sources.models import (
    check_finite,
    check_vocab,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)


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
    calibrates = method.needs_calibration or config.allocation is not None or smoothing_alpha(method_config) is not None
    calibration_text = (
        read_documents(config.calibration.dataset, config.calibration.text_column) if calibrates else None
    )
    run = Run(
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
        result = (quantize_streamed if config.low_memory else _in_memory)(run, staging)
        result.tokenizer.save_pretrained(staging)
        report = write_reports(staging, output, config, method_name, device, source, run.timings, result)
    return report


def _in_memory(run: Run, staging: Path) -> PathResult:
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
    if splits_experts(run):
        unfuse(model)
    selection = select_modules(model, config.skip_modules, tables=quantizes_tables(run))
    if config.allocation is not None and any(is_expert_layer(name) for name in selection.names):
        raise InputError(
            f"{option('allocation')} cannot mix widths across the experts of a mixture-of-experts model: transformers"
            f" 5.25 decompresses every expert with one scheme at load. Drop {option('allocation')} and pass "
            f"{option('bits')}."
        )
    if config.bits < 16:  # a 16-bit cast has no scale to overflow
        check_layers_quantizable(model, selection.names + selection.tables, config.model)
    kept_dtype = kept_dtype_for(run, model)
    original = original_sizes(run.source, model)
    before = None
    if config.eval is not None:
        start = time.perf_counter()
        before = measure_perplexity(model, tokenizer, config.eval, progress, "original", source=run.evaluation)
        timings["eval_original"] = time.perf_counter() - start
    calibration = calibration_for(run, tokenizer)
    smoothed = None
    if smoothing_alpha(run.method_config) is not None:
        start = time.perf_counter()
        with progress.task("smoothing", total=None):
            smoothed = smooth(model, calibration, smoothing_alpha(run.method_config))
        timings["smoothing"] = time.perf_counter() - start

    start = time.perf_counter()
    with progress.task(f"quantize ({run.method_name})", total=len(selection.names)) as advance:
        dtype = pick_dtype(config.dtype, run.device)
        request = quantize_request(
            run,
            model,
            tokenizer,
            selection,
            dtype,
            calibration,
            advance,
            kept_dtype,
            device_map=config.device_map,
            grid=run.grid,
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
