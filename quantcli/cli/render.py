"""Rendering: Rich tables and JSON on stdout, progress bars and messages on stderr. The tables of
eval, bench and compare are :mod:`quantcli.cli.render_measurements`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from quantcli.allocate.report import describe
from quantcli.cli.flags import cli_text
from quantcli.config.gates import GateResult
from quantcli.sources.gguf_input import summary as gguf_summary
from quantcli.strict_json import dumps

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True)


class RichProgress:
    """Progress bars on stderr; silent with ``--quiet`` and when stderr is not a terminal (logs, pipes)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and stderr.is_terminal

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        if not self.enabled:
            yield lambda advance: None
            return
        columns = [
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        if total is not None:  # units done of the total, and the time left at the recent rate
            columns += [TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=stderr) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda advance: bar.advance(task_id, advance)
            bar.update(task_id, completed=total or 1, total=total or 1)


def tolerate_terminal_encoding() -> None:
    """On a terminal that cannot encode a character (LANG=C, PYTHONIOENCODING=ascii), print a
    replacement instead of failing after the work is done."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):
                pass


def print_json(data: Any) -> None:
    stdout.out(dumps(data, indent=2), highlight=False)


def human_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def eval_settings_line(settings: dict[str, Any], scored: int) -> str:
    return (
        f"dataset {settings.get('dataset')} · {scored:,} tokens scored of {settings.get('tokens'):,} · "
        f"context {settings.get('seq_len')} · stride {settings.get('stride')} · protocol {settings.get('protocol')} · "
        f"BOS {settings.get('bos')}"
    )


def render_quantize(report: dict[str, Any]) -> None:
    size = report["size"]
    table = Table(
        title=f"quantcli: {report['model']} → {report['output']}  ({report['method']}, {report['bits']}-bit, "
        f"{report['format']})"
    )
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("quantized", justify="right")
    table.add_column("change", justify="right")
    ratio = size["disk_ratio"]
    table.add_row(
        "size on disk",
        human_bytes(size["original_disk_bytes"]),
        human_bytes(size["quantized_disk_bytes"]),
        f"{ratio:.2f}x smaller" if ratio else "",
    )
    memory_ratio = size["memory_ratio"]
    if memory_ratio and memory_ratio < 1.01:
        memory_change = "same: runs dequantized here"
    else:
        memory_change = f"{memory_ratio:.2f}x smaller" if memory_ratio else ""
    table.add_row(
        "size in memory",
        human_bytes(size["original_memory_bytes"]),
        human_bytes(size["quantized_memory_bytes"]),
        memory_change,
    )
    table.add_row(
        "bits per weight", f"{size['original_bits_per_weight']:.2f}", f"{size['quantized_bits_per_weight']:.2f}", ""
    )
    before, after, delta = report["perplexity_before"], report["perplexity_after"], report["perplexity_delta"]
    if before and after:
        table.add_row(
            "perplexity",
            f"{before['perplexity']:.4f}",
            f"{after['perplexity']:.4f}",
            f"{delta['absolute']:+.4f} ({delta['percent']:+.2f}%)",
        )
    for stage, seconds in report["timings"].items():
        table.add_row(f"time: {stage}", "", f"{seconds:.2f} s", "")
    stdout.print(table)
    if before:
        stdout.print(f"perplexity settings: {eval_settings_line(before['settings'], before['tokens_scored'])}")
    if size.get("original_format"):
        stdout.print(f"original: {gguf_summary(size['original_format'])}")
    options = ", ".join(f"{k}={v}" for k, v in report["options"].items())
    stdout.print(f"method settings: {options or 'defaults'} · device {report['device']}")
    if report["calibration"]:
        calib = report["calibration"]
        stdout.print(
            f"calibration: {calib['dataset']} · {calib['samples']} × {calib['seq_len']} tokens · seed {calib['seed']}"
        )
    if report.get("grouping"):
        stdout.print(report["grouping"]["summary"])
    for name, note in report["fallbacks"].items():
        stdout.print(f"[yellow]fallback[/] {name}: {note}")
    render_weights(report.get("weights"), report.get("stats") or {})
    if (report.get("stats") or {}).get("allocation"):
        for line in describe(report["stats"]["allocation"]):
            stdout.print(cli_text(line), markup=False)
    render_breakdown(size.get("breakdown"))
    render_gates(report.get("gates") or [])


def render_weights(weights: dict[str, Any] | None, stats: dict[str, Any]) -> None:
    """The share of matmul weights quantized, the warning when too much stays full precision unasked,
    and the calibration tokens each expert got (mixture-of-experts models)."""
    if weights:
        share, total = weights["quantized_share"], weights["matmul_parameters"]
        stdout.print(f"weights quantized: {share:.1%} of {total:,} matmul parameters")
        if weights.get("warning"):
            stdout.print(f"[yellow]warning[/] {escape(weights['warning'])}")
    routed = [count for counts in (stats.get("tokens_per_expert") or {}).values() for count in counts]
    if routed:
        middle = sorted(routed)[len(routed) // 2]
        stdout.print(
            f"calibration tokens per expert: min {min(routed)}, median {middle}, max {max(routed)}"
            f" over {len(routed)} experts;"
            f" {stats.get('experts_rounded_to_nearest', 0)} expert layers rounded to nearest (too few tokens)"
        )


def render_gates(records: list[dict[str, Any]]) -> None:

    for record in records:
        result = GateResult(**record)
        stdout.print(
            f"{'[green]gate passed[/]' if result.passed else '[red]gate FAILED[/]'}: {cli_text(result.message)}"
        )


def render_breakdown(breakdown: dict[str, Any] | None) -> None:
    """The checkpoint's bytes by tensor class (embeddings, head, quantized linears, scales, other)."""
    if not breakdown:
        return
    table = Table(title="size by tensor class")
    for column in ("class", "bytes", "share", "stored as"):
        table.add_column(column, justify="right" if column in ("bytes", "share") else "left")
    for name, value in breakdown["classes"].items():
        table.add_row(
            name.replace("_", " "),
            human_bytes(value["bytes"]),
            f"{100 * value['share']:.1f}%",
            ", ".join(value.get("dtypes", [])),
        )
    bits = breakdown.get("bits_per_weight")
    table.add_row("total", human_bytes(breakdown["tensor_bytes"]), f"{bits:.2f} bits/weight" if bits else "", "")
    stdout.print(table)


def render_inspect(info: dict[str, Any]) -> None:
    stdout.print(
        f"method {info['method']} · {info['bits']}-bit · format {info['format']} · quantcli format "
        f"v{info['format_version']}"
    )
    options = ", ".join(f"{k}={v}" for k, v in (info.get("options") or {}).items())
    stdout.print(f"options: {options or 'defaults'} · weights on disk {human_bytes(info.get('disk_bytes'))}")
    table = Table(title="layers")
    for column in ("layer", "bits", "scheme", "group", "shape", "note"):
        table.add_column(column)
    for name, layer in info["layers"].items():
        shape = "×".join(map(str, layer.get("shape") or [])) or ""
        table.add_row(
            name,
            str(layer["bits"]),
            layer["scheme"],
            str(layer.get("group_size") or "-"),
            shape,
            layer.get("note") or "",
        )
    for name, why in (info.get("skipped") or {}).items():
        table.add_row(name, "-", "kept", "-", "", why)
    stdout.print(table)
    render_breakdown(info.get("size_breakdown"))
