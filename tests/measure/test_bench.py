"""`quantcli bench` on stories260K: positive speeds and the documented JSON keys."""

from __future__ import annotations

import json
import subprocess
import sys

MODEL_KEYS = {
    "name",
    "method",
    "bits",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "latency_ms_per_token",
    "prefill_ms",
    "peak_memory_bytes",
    "peak_rss_bytes",
    "peak_memory_kind",
    "model_memory_bytes",
}


def test_bench_json_against_base(tmp_path, stories_path):
    args = [
        "bench",
        stories_path,
        "--base",
        "stories260K",
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "4",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
        "-q",
    ]
    result = subprocess.run([sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"schema_version", "device", "settings", "model", "base", "speedup", "gates"}
    assert data["settings"] == {
        "prompt_tokens": 16,
        "new_tokens": 4,
        "repeats": 2,
        "warmup": 1,
        "dataset": "tinystories:eval",
        "backend": "auto",
    }
    for side in ("model", "base"):
        assert set(data[side]) == MODEL_KEYS
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "latency_ms_per_token", "model_memory_bytes"):
            assert data[side][key] > 0
        assert data[side]["peak_memory_bytes"] > 0 and data[side]["peak_memory_kind"] == "cpu_rss_high_water_increase"
    assert data["model"]["model_memory_bytes"] == data["base"]["model_memory_bytes"]
    assert set(data["speedup"]) == {"prefill", "decode"} and all(v > 0 for v in data["speedup"].values())
    assert data["gates"] == []


def test_bench_table_and_bad_option():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantcli",
            "bench",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "decode tokens/s" in ok.stdout and ok.stderr == ""
    bad = subprocess.run(
        [sys.executable, "-m", "quantcli", "bench", "--repeats", "0"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--repeats must be a positive integer" in bad.stderr


def test_cpu_peak_catches_memory_freed_before_any_sample():
    """The RSS high-water mark sees a 200 MB activation that is gone before the next sample."""
    import torch

    from quantcli.measure.speed import _Memory

    memory = _Memory(torch.device("cpu"))
    torch.ones(50_000_000).add_(1)  # 200 MB, allocated and freed between samples
    memory.sample()
    result = memory.result()
    assert result["peak_memory_kind"] == "cpu_rss_high_water_increase"
    assert result["peak_memory_bytes"] >= 190_000_000
