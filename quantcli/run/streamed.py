"""The streamed quantize path (--low-memory): a meta-device skeleton filled and quantized one decoder
block at a time from the safetensors shards."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from quantcli.errors import InputError, ResumableInterrupt, UnavailableError, option
from quantcli.formats import get_format
from quantcli.measure.perplexity import check_context
from quantcli.quant.layers import is_conv1d, select_modules
from quantcli.quant.moe import fused_experts, unfuse
from quantcli.run.plan import (
    Run,
    calibration_for,
    kept_dtype_for,
    original_sizes,
    quantize_request,
    quantizes_tables,
    splits_experts,
    table_bits,
)
from quantcli.run.reportfiles import PathResult
from quantcli.run.streaming import ShardBlocks
from quantcli.sources.integrity import check_streamed, file_shapes
from quantcli.sources.models import (
    check_vocab,
    load_tokenizer,
    pick_dtype,
    skeleton,
)


def quantize_streamed(run: Run, staging: Path) -> PathResult:
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
    if splits_experts(run):
        unfuse(model)
    elif fused_experts(model):
        raise UnavailableError(
            f"{option('low_memory', True)} streams the experts of a mixture-of-experts model with {option('method')}"
            f" rtn or gptq, not {run.method_name}."
        )
    check_vocab(model, tokenizer, config.model)
    if run.method.needs_calibration:
        check_context(model, config.calibration.seq_len, "calibration.seq_len")
    selection = select_modules(model, config.skip_modules, tables=quantizes_tables(run))
    kept_dtype = kept_dtype_for(run, model)
    if any(is_conv1d(module) for name, module in model.named_modules() if name in selection.names):
        raise UnavailableError(
            f"{option('low_memory', True)} supports models built from Linear layers (Llama, Mistral, Qwen, ...), not "
            "GPT-2's Conv1D."
        )
    original = original_sizes(run.source, model, skeleton=True)
    calibration = calibration_for(run, tokenizer)
    settings = {
        "source": str(Path(run.source).resolve()),
        "method": run.method_name,
        "options": asdict(run.method_config),
        "skip_modules": list(config.skip_modules),
        "dtype": str(dtype),
        "tables": list(selection.tables),
        "table_bits": table_bits(config),
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
            request = quantize_request(
                run, model, tokenizer, selection, dtype, calibration, advance, kept_dtype, blocks=blocks
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
