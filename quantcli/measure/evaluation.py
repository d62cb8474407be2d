"""Perplexity of any model on any text with every setting recorded (``quantcli eval``), and the
measurement ``quantize`` makes before and after."""

from __future__ import annotations

from typing import Any

from quantcli import SCHEMA_VERSION
from quantcli.checkpoint.load import load
from quantcli.config.quantize import EvalConfig
from quantcli.errors import DatasetError, option
from quantcli.measure.perplexity import EvalResult, check_context, evaluate_sequences
from quantcli.progress import NullProgress, Progress
from quantcli.quant.finite import check_perplexity_finite
from quantcli.quant.layers import bytes_in_memory
from quantcli.sources.datasets import TextSource, read_documents, token_sequences
from quantcli.sources.gguf_input import describe
from quantcli.sources.integrity import check_same_vocabulary
from quantcli.sources.models import bytes_on_disk, resolve_model, weight_files


def eval_source(config: EvalConfig) -> TextSource:
    """The evaluation text, opened and checked (call before loading a model)."""
    source = read_documents(config.dataset, config.text_column, config.doc_separator)
    source.check_protocol(config.protocol)
    return source


def measure_perplexity(
    model: Any,
    tokenizer: Any,
    config: EvalConfig,
    progress: Progress,
    label: str,
    base_model: Any = None,
    source: TextSource | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``config.dataset`` with every setting recorded."""
    source = source or eval_source(config)
    check_context(model, config.seq_len)
    sequences = token_sequences(source, tokenizer, config.protocol, config.bos, config.max_tokens)
    total = sum(len(s) for s in sequences)
    if total < config.seq_len and (config.max_tokens is None or total < config.max_tokens):
        raise DatasetError(
            f"evaluation dataset {config.dataset} has {total} tokens, fewer than one window of "
            f"{option('eval.seq_len', config.seq_len)}."
            f" Use more text or a shorter {option('eval.seq_len')}."
        )
    settings = {
        "dataset": config.dataset,
        "protocol": config.protocol,
        "bos": config.bos,
        "max_tokens": config.max_tokens,
        "text_column": config.text_column,
        "doc_separator": config.doc_separator,
    }
    with progress.task(f"eval {label}", total=sum(len(s) - 1 for s in sequences)) as advance:
        result = evaluate_sequences(
            model, sequences, config.seq_len, config.effective_stride, config.batch_size, settings, base_model, advance
        )
    check_perplexity_finite(result.perplexity, label)
    return result


def evaluate(
    model: str,
    config: EvalConfig,
    base: str | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    backend: str = "auto",
    base_model: Any = None,
    base_tokenizer: Any = None,
) -> dict[str, Any]:
    """Perplexity and speed of any checkpoint, and KL / top-1 agreement against ``base`` if given
    (``base_model``: that model already loaded, as ``compare`` passes it for every row)."""
    progress = progress or NullProgress()
    source = eval_source(config)
    with progress.task("load model", total=None):
        loaded, tokenizer, metadata = load(model, device, backend=backend)
        if base and base_model is None:
            base_model, base_tokenizer, _ = load(base, device)
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
