"""Inference speed and memory: prefill tokens/s, greedy KV-cache decode tokens/s, latency per token,
peak memory, model memory; medians over repeats after warm-up, optionally against a base model.

Decode is timed token by token (one forward of one token with the KV cache, greedy argmax), so the
numbers exclude sampling and ``generate`` bookkeeping. Peak memory is ``torch.cuda.max_memory_allocated``
on CUDA and, on CPU, the process RSS peak sampled around every forward (psutil) minus the RSS before
the first run: an estimate of activations, KV cache and allocator growth.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from quantcli.config import DEFAULT_EVAL_DATASET, check_positive
from quantcli.errors import DatasetError, InputError
from quantcli.gates import GateLimits, check_speedup, to_records
from quantcli.progress import NullProgress, Progress

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    dataset: str = DEFAULT_EVAL_DATASET
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"--warmup must be 0 or more, got {self.warmup!r}.")


def prompt_ids(tokenizer: Any, config: BenchConfig) -> Any:
    """The first ``prompt_tokens`` tokens of the evaluation text (as ``tokenizer(text)``), shape ``[1, N]``."""
    from quantcli.data import read_documents, token_sequences

    stream = token_sequences(read_documents(config.dataset), tokenizer, "stream", "auto", config.prompt_tokens)[0]
    if stream.numel() < config.prompt_tokens:
        raise DatasetError(f"{config.dataset} holds {stream.numel()} tokens, fewer than --prompt-tokens {config.prompt_tokens}.")
    return stream[None]


class _Memory:
    """Peak memory of the runs: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: Any) -> None:
        import psutil
        import torch

        self.cuda = device.type == "cuda"
        self.process = psutil.Process()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device
        self.start = self.process.memory_info().rss
        self.peak = self.start

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, self.process.memory_info().rss)

    def result(self) -> dict[str, int]:
        import torch

        if self.cuda:
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)), "peak_memory_kind": "cuda_max_memory_allocated"}
        return {"peak_memory_bytes": int(self.peak - self.start), "peak_rss_bytes": int(self.peak), "peak_memory_kind": "cpu_rss_increase"}


def _run(model: Any, ids: Any, new_tokens: int, memory: _Memory) -> tuple[float, list[float]]:
    """One prefill plus ``new_tokens`` greedy decode steps: (prefill seconds, per-token seconds)."""
    import torch

    def sync() -> None:
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)

    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync()
        prefill = time.perf_counter() - start
        memory.sample()
        token = out.logits[:, -1:].argmax(-1)
        cache = out.cache
        steps = []
        for _ in range(new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)  # transformers 5.24 renamed past_key_values
            token = out.logits[:, -1:].argmax(-1)
            sync()
            steps.append(time.perf_counter() - start)
            cache = out.cache
            memory.sample()
    return prefill, steps


def measure(model: Any, ids: Any, config: BenchConfig) -> dict[str, Any]:
    """Median prefill and decode speed of a loaded model over ``config.repeats`` runs after warm-up."""
    from quantcli.models import bytes_in_memory

    device = next(model.parameters()).device
    ids = ids.to(device)
    for _ in range(config.warmup):
        _run(model, ids, min(config.new_tokens, 8), _Memory(device))
    memory = _Memory(device)
    prefills, decodes, latencies = [], [], []
    for _ in range(config.repeats):
        prefill, steps = _run(model, ids, config.new_tokens, memory)
        prefills.append(prefill)
        decodes.append(sum(steps))
        latencies.append(statistics.median(steps))
    prefill_s, decode_s = statistics.median(prefills), statistics.median(decodes)
    return {
        "prefill_tokens_per_s": ids.shape[1] / prefill_s,
        "decode_tokens_per_s": config.new_tokens / decode_s,
        "latency_ms_per_token": 1000 * statistics.median(latencies),
        "prefill_ms": 1000 * prefill_s,
        **memory.result(),
        "model_memory_bytes": bytes_in_memory(model),
    }


def bench(model: str, config: BenchConfig, base: str | None = None, device: str = "auto", limits: GateLimits | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Speed and memory of ``model`` (and of ``base`` with speedup ratios); gates recorded, not raised."""
    from quantcli.checkpoint import load
    from quantcli.models import pick_device

    progress = progress or NullProgress()
    limits = limits or GateLimits()
    results: dict[str, Any] = {}
    for label, spec in (("model", model), ("base", base)):
        if spec is None:
            continue
        with progress.task(f"bench {label}", total=None):
            loaded, tokenizer, metadata = load(spec, device, backend=config.backend if label == "model" else "auto")
            results[label] = {"name": spec, "method": (metadata or {}).get("method"), "bits": (metadata or {}).get("bits"), **measure(loaded, prompt_ids(tokenizer, config), config)}
            del loaded
    speedup = None
    if base:
        speedup = {key: results["model"][f"{key}_tokens_per_s"] / results["base"][f"{key}_tokens_per_s"] for key in ("prefill", "decode")}
    return {
        "schema_version": SCHEMA_VERSION,
        "device": pick_device(device),
        "settings": {key: getattr(config, key) for key in ("prompt_tokens", "new_tokens", "repeats", "warmup", "dataset", "backend")},
        "model": results["model"],
        "base": results.get("base"),
        "speedup": speedup,
        "gates": to_records(check_speedup(limits, speedup and speedup["decode"])),
    }
