"""The two library entry points behind the CLI: ``quantize`` (load → calibrate → quantize → save →
evaluate → Report) and ``evaluate`` (perplexity and speed of any checkpoint)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from quantcli import __version__
from quantcli.checkpoint import FORMAT_VERSION, METADATA_FILE, REPORT_FILE, atomic_folder, check_output, load, write_json
from quantcli.config import EvalConfig, QuantizeConfig
from quantcli.gates import check_quantize, to_records
from quantcli.gguf_input import describe
from quantcli.data import TextSource, calibration_batch, read_documents, token_sequences
from quantcli.errors import DatasetError
from quantcli.finite import check_layers_quantizable, check_model_finite, check_perplexity_finite
from quantcli.integrity import check_same_vocabulary
from quantcli.perplexity import EvalResult, check_context, evaluate_sequences
from quantcli.methods import default_method, get_method
from quantcli.methods.base import QuantizeRequest
from quantcli.models import (
    bytes_in_memory,
    bytes_on_disk,
    check_finite,
    check_vocab,
    load_model,
    load_tokenizer,
    parameter_count,
    pick_device,
    pick_dtype,
    resolve_model,
    select_modules,
    weight_files,
)
from quantcli.progress import NullProgress, Progress
from quantcli.report import QuantizeReport, size_summary

SCHEMA_VERSION = 1


def default_output(model: str, method: str, bits: int) -> Path:
    return Path(f"{Path(model.rstrip('/')).name}-{method}-w{bits}")


def eval_source(config: EvalConfig) -> TextSource:
    """The evaluation text, opened and checked (call before loading a model)."""
    source = read_documents(config.dataset, config.text_column, config.doc_separator)
    source.check_protocol(config.protocol)
    return source


def measure_perplexity(
    model: Any, tokenizer: Any, config: EvalConfig, progress: Progress, label: str, base_model: Any = None, source: TextSource | None = None
) -> EvalResult:
    """Perplexity of ``model`` on ``config.dataset`` with every setting recorded."""
    source = source or eval_source(config)
    check_context(model, config.seq_len)
    sequences = token_sequences(source, tokenizer, config.protocol, config.bos, config.max_tokens)
    total = sum(len(s) for s in sequences)
    if total < config.seq_len and (config.max_tokens is None or total < config.max_tokens):
        raise DatasetError(
            f"evaluation dataset {config.dataset} has {total} tokens, fewer than one window of --seq-len"
            f" {config.seq_len}. Use more text or a shorter --seq-len."
        )
    settings = {
        "dataset": config.dataset, "protocol": config.protocol, "bos": config.bos, "max_tokens": config.max_tokens,
        "text_column": config.text_column, "doc_separator": config.doc_separator,
    }
    with progress.task(f"eval {label}", total=sum(len(s) - 1 for s in sequences)) as advance:
        result = evaluate_sequences(
            model, sequences, config.seq_len, config.effective_stride, config.batch_size, settings, base_model, advance
        )
    check_perplexity_finite(result.perplexity, label)
    return result


def quantize(config: QuantizeConfig, progress: Progress | None = None) -> QuantizeReport:
    """Quantize ``config.model`` and write the checkpoint; returns the report (also saved as report.json)."""
    progress = progress or NullProgress()
    timings: dict[str, float] = {}
    device = pick_device(config.device)
    method_name = config.method or default_method(config.bits, device)
    method = get_method(method_name)
    method_config = method.make_config(config.bits, config.method_options)
    reason = method.unavailable_reason(device)
    if reason:
        from quantcli.errors import UnavailableError

        raise UnavailableError(f"method {method_name} cannot run on {device} here: {reason}")
    source = resolve_model(config.model)
    output = Path(config.output) if config.output else default_output(config.model, method_name, config.bits)
    check_output(output, config.force, source)
    evaluation = eval_source(config.eval) if config.eval is not None else None
    calibration_text = read_documents(config.calibration.dataset, config.calibration.text_column) if method.needs_calibration else None

    start = time.perf_counter()
    with progress.task("load model", total=None):
        tokenizer = load_tokenizer(source, config.trust_remote_code)
        model = load_model(source, pick_dtype(config.dtype, device), config.device_map or device, config.trust_remote_code)
        check_vocab(model, tokenizer, config.model)
        check_finite(model, config.model)
        if method.needs_calibration:
            check_context(model, config.calibration.seq_len)
    timings["load"] = time.perf_counter() - start
    selection = select_modules(model, config.skip_modules)
    if config.bits < 16:  # a 16-bit cast has no scale to overflow
        check_layers_quantizable(model, selection.names, config.model)
    original_files = weight_files(source)
    original = {
        "disk_bytes": bytes_on_disk(original_files),
        "memory_bytes": bytes_in_memory(model),
        "parameters": parameter_count(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    before = None
    if config.eval is not None:
        start = time.perf_counter()
        before = measure_perplexity(model, tokenizer, config.eval, progress, "original", source=evaluation)
        timings["eval_original"] = time.perf_counter() - start

    calibration = None
    if method.needs_calibration:
        start = time.perf_counter()
        with progress.task("calibration data", total=None):
            calib = config.calibration
            calibration = calibration_batch(calibration_text, tokenizer, calib.samples, calib.seq_len, calib.seed)
        timings["calibration"] = time.perf_counter() - start

    start = time.perf_counter()
    with progress.task(f"quantize ({method_name})", total=len(selection.names)) as advance:
        request = QuantizeRequest(
            source, model, tokenizer, selection.names, device, pick_dtype(config.dtype, device), method_config,
            calibration, config.trust_remote_code, advance, config.device_map,
        )
        del model
        quantized = method.quantize(request)
        check_model_finite(quantized.model, config.model)
        del request
        gc.collect()
    timings["quantize"] = time.perf_counter() - start

    after = None
    if config.eval is not None:
        start = time.perf_counter()
        after = measure_perplexity(quantized.model, tokenizer, config.eval, progress, "quantized", source=evaluation)
        timings["eval_quantized"] = time.perf_counter() - start

    quantized_memory = bytes_in_memory(quantized.model)
    start = time.perf_counter()
    with progress.task("save", total=None), atomic_folder(output, config.force) as staging:
        quantized.save(staging, config.max_shard_size)
        tokenizer.save_pretrained(staging)
        quantized_bytes = bytes_on_disk(weight_files(str(staging)))
        timings["save"] = time.perf_counter() - start
        report = QuantizeReport(
            schema_version=SCHEMA_VERSION,
            quantcli_version=__version__,
            model=config.model,
            output=str(output),
            method=method_name,
            bits=config.bits,
            format=quantized.format,
            device=device,
            options=quantized.options,
            recipe=config.to_dict(),
            calibration=None if calibration is None else {**vars(config.calibration), "tokens": int(calibration.numel())},
            size={**size_summary(original, quantized_bytes, quantized_memory), "original_format": describe(source)},
            perplexity_before=before,
            perplexity_after=after,
            timings=timings,
            layers=quantized.layers,
            skipped=selection.skipped,
            stats=quantized.stats,
        )
        metadata = {
            "format_version": FORMAT_VERSION,
            "quantcli_version": __version__,
            "method": method_name,
            "bits": config.bits,
            "format": quantized.format,
            "options": quantized.options,
            "source_model": config.model,
            "layers": report.to_dict()["layers"],
            "skipped": selection.skipped,
        }
        report.gates = to_records(check_quantize(config.gates, report.to_dict()))
        write_json(staging / METADATA_FILE, metadata)
        write_json(staging / REPORT_FILE, report.to_dict())
    return report


def evaluate(
    model: str, config: EvalConfig, base: str | None = None, device: str = "auto", progress: Progress | None = None, backend: str = "auto"
) -> dict[str, Any]:
    """Perplexity and speed of any checkpoint, and KL / top-1 agreement against ``base`` if given."""
    progress = progress or NullProgress()
    source = eval_source(config)
    with progress.task("load model", total=None):
        loaded, tokenizer, metadata = load(model, device, backend=backend)
        base_model, base_tokenizer, _ = load(base, device) if base else (None, None, None)
    if base_model is not None:
        check_same_vocabulary(model, loaded, tokenizer, base, base_model, base_tokenizer)
    result = measure_perplexity(loaded, tokenizer, config, progress, "model", base_model, source)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "base": base,
        "method": (metadata or {}).get("method"),
        "bits": (metadata or {}).get("bits"),
        "backend": backend,
        "memory_bytes": bytes_in_memory(loaded),
        "disk_bytes": bytes_on_disk(weight_files(resolve_model(model))),
        "source_format": describe(resolve_model(model)),
        **result.to_dict(),
    }
