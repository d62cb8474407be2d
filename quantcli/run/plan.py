"""One quantize run's plan, settled before any work: the method and its config, the output, the texts,
and what the run quantizes and keeps (the embedding, experts, kept dtypes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcli.config.quantize import QuantizeConfig
from quantcli.errors import UnavailableError, option
from quantcli.methods import capable
from quantcli.progress import Progress
from quantcli.quant.keptdtype import storage_dtype
from quantcli.quant.layers import bytes_in_memory, parameter_count
from quantcli.quant.records import QuantizeRequest
from quantcli.sources.datasets import TextSource, calibration_batch
from quantcli.sources.models import (
    bytes_on_disk,
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
class Run:
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


def original_sizes(source: str, model: Any, skeleton: bool = False) -> dict[str, Any]:
    """Sizes before quantizing; a streaming skeleton's (meta) tensors count at their dtype's size."""
    tensors = [*model.parameters(), *model.buffers()]
    return {
        "disk_bytes": bytes_on_disk(weight_files(source)),
        "memory_bytes": sum(t.numel() * t.element_size() for t in tensors) if skeleton else bytes_in_memory(model),
        "parameters": parameter_count(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def quantizes_tables(run: Run) -> bool:
    """Whether the input embedding and output head are quantized too (``--embeddings 8`` or ``4``)."""
    return (
        run.method.quantizes_tables
        and run.grid is None
        and run.config.embeddings not in ("keep", None)
        and run.config.bits < 16
    )


def splits_experts(run: Run) -> bool:
    """Whether fused experts become one layer per expert (:mod:`quantcli.quant.moe`): the integer methods,
    writing compressed-tensors or GGUF; other methods keep them fused, in 16 bits, and say so."""
    return run.method.output_format == "compressed-tensors"


def table_bits(config: QuantizeConfig) -> int:
    return config.embeddings if isinstance(config.embeddings, int) else 8


def kept_dtype_for(run: Run, model: Any) -> Any:
    """The 16-bit (or asked) dtype an integer checkpoint stores its unquantized tensors in, or None."""
    if (
        run.method.output_format != "compressed-tensors" or run.grid is not None
    ):  # GGUF keeps norms in F32, as llama.cpp does
        return None

    return storage_dtype(run.config.keep_dtype or "auto", run.source, model)


def scale_dtype_for(run: Run, kept_dtype: Any) -> str | None:
    """What integer layers store their scales in: the kept dtype (``bfloat16``...), rounded before the
    integers are chosen; None (the model's dtype) with a 4-bit embedding, whose checkpoint plain
    transformers decompresses at load in the scales' own dtype (docs/WHOLEMODEL.md)."""
    if kept_dtype is None or (quantizes_tables(run) and table_bits(run.config) < 8):
        return None
    return str(kept_dtype).removeprefix("torch.")


def smoothing_alpha(method_config: Any) -> float | None:
    """SmoothQuant's alpha when the run smooths before quantizing (``--smoothing``), else None."""
    return getattr(method_config, "smoothing", None)


def calibration_for(run: Run, tokenizer: Any) -> Any:
    if (
        not run.method.needs_calibration
        and run.config.allocation is None
        and smoothing_alpha(run.method_config) is None
    ):
        return None
    start = time.perf_counter()
    with run.progress.task("calibration data", total=None):
        calib = run.config.calibration
        batch = calibration_batch(run.calibration_text, tokenizer, calib.samples, calib.seq_len, calib.seed)
    run.timings["calibration"] = time.perf_counter() - start
    return batch


def quantize_request(
    run: Run,
    model: Any,
    tokenizer: Any,
    selection: Any,
    dtype: Any,
    calibration: Any,
    advance: Any,
    kept_dtype: Any,
    **source: Any,
) -> QuantizeRequest:
    """What both paths hand the method; ``source`` says where its blocks come from (``blocks`` when streamed,
    ``device_map`` and ``grid`` in memory)."""
    return QuantizeRequest(
        run.source,
        model,
        tokenizer,
        selection.names,
        run.device,
        dtype,
        run.method_config,
        calibration,
        run.config.trust_remote_code,
        advance,
        tables=selection.tables,
        table_bits=table_bits(run.config),
        scale_dtype=scale_dtype_for(run, kept_dtype),
        **source,
    )
