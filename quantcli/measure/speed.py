"""Inference speed and memory: prefill tokens/s, greedy KV-cache decode tokens/s, latency per token,
peak memory, model memory; medians over repeats after warm-up, optionally against a base model.

Decode is timed token by token (one forward of one token with the KV cache, greedy argmax), so the
numbers exclude sampling and ``generate`` bookkeeping. Peak memory is ``torch.cuda.max_memory_allocated``
on CUDA and, on CPU, the process's RSS high-water mark over the runs (warm-up included) minus the RSS
before the first run: activations, KV cache and allocator growth (see :class:`_Memory`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli import SCHEMA_VERSION
from quantcli.checkpoint.conditions import check_bench_context
from quantcli.checkpoint.load import load
from quantcli.config.gates import GateLimits, check_speedup, to_records
from quantcli.config.quantize import DEFAULT_EVAL_DATASET
from quantcli.config.validators import check_positive
from quantcli.errors import DatasetError, InputError, option
from quantcli.limits import bound_bench
from quantcli.progress import NullProgress, Progress
from quantcli.quant.layers import bytes_in_memory
from quantcli.sources.datasets import read_documents, token_sequences
from quantcli.sources.models import pick_device


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
            check_positive(option(name), getattr(self, name))
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"{option('warmup')} must be 0 or more, got {self.warmup!r}.")

        bound_bench(self)


def prompt_ids(tokenizer: Any, config: BenchConfig) -> Any:
    """The first ``prompt_tokens`` tokens of the evaluation text (as ``tokenizer(text)``), shape ``[1, N]``."""
    stream = token_sequences(read_documents(config.dataset), tokenizer, "stream", "auto", config.prompt_tokens)[0]
    if stream.numel() < config.prompt_tokens:
        raise DatasetError(
            f"{config.dataset} holds {stream.numel()} tokens, fewer than "
            f"{option('prompt_tokens', config.prompt_tokens)}."
        )
    return stream[None]


def _rss_high_water() -> int | None:
    """The kernel's peak RSS of this process since the last reset (Linux ``VmHWM``), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand memory freed by earlier models back to the OS (glibc ``malloc_trim``), so this run's
    activations grow the RSS instead of silently reusing it; a no-op where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Memory:
    """Peak memory of the runs: the CUDA allocator peak, or on CPU the process's RSS high-water mark
    (Linux resets it through ``/proc/self/clear_refs``; elsewhere RSS sampled after every forward)
    minus the RSS before the first run, warm-up included (free heap released to the OS first):
    activations, KV cache, allocator growth."""

    def __init__(self, device: Any) -> None:
        import psutil
        import torch

        self.cuda = device.type == "cuda"
        self.process = psutil.Process()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _release_free_heap()
        self.device = device
        self.start = self.process.memory_info().rss
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.high_water = _rss_high_water() is not None
        except OSError:
            self.high_water = False
        self.peak = self.start

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, self.process.memory_info().rss)

    def result(self) -> dict[str, Any]:
        import torch

        if self.cuda:
            return {
                "peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "peak_memory_kind": "cuda_max_memory_allocated",
            }
        peak = max(self.peak, _rss_high_water() or 0) if self.high_water else self.peak
        kind = "cpu_rss_high_water_increase" if self.high_water else "cpu_rss_sampled_increase"
        return {"peak_memory_bytes": int(peak - self.start), "peak_rss_bytes": int(peak), "peak_memory_kind": kind}


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
    device = next(model.parameters()).device
    ids = ids.to(device)
    memory = _Memory(device)  # before warm-up: the first run is where activations and caches grow
    for _ in range(config.warmup):
        _run(model, ids, min(config.new_tokens, 8), memory)
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


def bench(
    model: str,
    config: BenchConfig,
    base: str | None = None,
    device: str = "auto",
    limits: GateLimits | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Speed and memory of ``model`` (and of ``base`` with speedup ratios); gates recorded, not raised."""

    progress = progress or NullProgress()
    limits = limits or GateLimits()
    results: dict[str, Any] = {}
    for label, spec in (("model", model), ("base", base)):
        if spec is None:
            continue
        with progress.task(f"bench {label}", total=None):
            loaded, tokenizer, metadata = load(spec, device, backend=config.backend if label == "model" else "auto")
            check_bench_context(loaded, config.prompt_tokens, config.new_tokens)
            results[label] = {
                "name": spec,
                "method": (metadata or {}).get("method"),
                "bits": (metadata or {}).get("bits"),
                **measure(loaded, prompt_ids(tokenizer, config), config),
            }
            del loaded
    speedup = None
    if base:
        speedup = {
            key: results["model"][f"{key}_tokens_per_s"] / results["base"][f"{key}_tokens_per_s"]
            for key in ("prefill", "decode")
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "device": pick_device(device),
        "settings": {
            key: getattr(config, key)
            for key in ("prompt_tokens", "new_tokens", "repeats", "warmup", "dataset", "backend")
        },
        "model": results["model"],
        "base": results.get("base"),
        "speedup": speedup,
        "gates": to_records(check_speedup(limits, speedup and speedup["decode"])),
    }
