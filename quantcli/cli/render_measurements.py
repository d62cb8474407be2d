"""Rendering of the measurement commands' results (eval, bench, compare) as Rich tables on stdout;
what they share with the quantize report (the console, sizes, gates) is :mod:`quantcli.cli.render`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from quantcli.cli.render import eval_settings_line, human_bytes, render_gates, stdout
from quantcli.sources.gguf_input import summary as gguf_summary


def render_eval(result: dict[str, Any]) -> None:
    table = Table(title=f"quantcli eval: {result['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    low, high = result["ci95"]
    table.add_row("perplexity", f"{result['perplexity']:.4f}  (95% CI {low:.4f}–{high:.4f})")
    table.add_row("mean NLL (nats/token)", f"{result['nll']:.5f}")
    if result.get("kl_divergence") is not None:
        table.add_row("KL divergence vs base", f"{result['kl_divergence']:.6f}")
        table.add_row("top-1 agreement vs base", f"{100 * result['top1_agreement']:.2f}%")
    table.add_row("tokens/s (prefill, eval windows)", f"{result['tokens_per_second']:,.0f}")
    table.add_row("model memory", human_bytes(result["memory_bytes"]))
    table.add_row("size on disk", human_bytes(result["disk_bytes"]))
    stdout.print(table)
    if result.get("source_format"):
        stdout.print(f"source: {gguf_summary(result['source_format'])}")
    stdout.print(f"settings: {eval_settings_line(result['settings'], result['tokens_scored'])}")


def render_bench(result: dict[str, Any]) -> None:
    base, speedup = result.get("base"), result.get("speedup")
    settings = result["settings"]
    table = Table(
        title=f"quantcli bench: {result['model']['name']} on {result['device']} (backend {settings['backend']})"
    )
    table.add_column("metric")
    table.add_column("model", justify="right")
    if base:
        table.add_column(f"base {base['name']}", justify="right")
        table.add_column("speedup", justify="right")
    rows = [
        ("prefill tokens/s", "prefill_tokens_per_s", "{:,.1f}", "prefill"),
        ("decode tokens/s", "decode_tokens_per_s", "{:,.1f}", "decode"),
        ("latency per new token", "latency_ms_per_token", "{:.2f} ms", None),
    ]
    for label, key, fmt, ratio in rows:
        cells = [fmt.format(result["model"][key])]
        if base:
            cells += [fmt.format(base[key]), f"{speedup[ratio]:.2f}x" if ratio else ""]
        table.add_row(label, *cells)
    for label, key in (("peak memory", "peak_memory_bytes"), ("model memory", "model_memory_bytes")):
        table.add_row(label, human_bytes(result["model"][key]), *([human_bytes(base[key]), ""] if base else []))
    stdout.print(table)
    stdout.print(
        f"settings: {settings['prompt_tokens']} prompt tokens · {settings['new_tokens']} new tokens (greedy, KV cache) "
        "·"
        f" median of {settings['repeats']} after {settings['warmup']} warm-up · peak memory: "
        f"{result['model']['peak_memory_kind']}"
    )
    render_gates(result.get("gates") or [])


def render_compare(result: dict[str, Any]) -> None:
    table = Table(title=f"quantcli compare{' vs ' + result['base'] if result['base'] else ''}")
    for column in (
        "checkpoint",
        "method",
        "bits",
        "size on disk",
        "bits/weight",
        "perplexity",
        "Δ vs base",
        "KL",
        "top-1",
    ):
        table.add_column(column, justify="left" if column in ("checkpoint", "method") else "right")

    def number(value: Any, fmt: str, suffix: str = "") -> str:
        return "n/a" if value is None else format(value, fmt) + suffix

    for row in result["rows"]:
        table.add_row(
            Path(row["checkpoint"]).name,
            row["method"],
            str(row["bits"]),
            human_bytes(row["disk_bytes"]),
            number(row["bits_per_weight"], ".2f"),
            number(row["perplexity"], ".4f"),
            number(row["perplexity_delta_percent"], "+.2f", "%"),
            number(row["kl_divergence"], ".5f"),
            number(row["top1_agreement"] and 100 * row["top1_agreement"], ".1f", "%"),
        )
    stdout.print(table)
    if result["settings_note"]:
        stdout.print(result["settings_note"])
    if result["plot"]:
        stdout.print(f"plot: {result['plot']}")
