"""``quantcli bench``: prefill and decode speed, latency and memory, with an optional speedup gate."""

from __future__ import annotations

import typer

from quantcli.cli import render
from quantcli.cli.boundary import handle_errors
from quantcli.cli.options import BACKEND_OPTION, DEVICE_OPTION, JSON_OPTION, QUIET_OPTION
from quantcli.cli.render_measurements import render_bench
from quantcli.config.gates import GateLimits, enforce
from quantcli.measure.speed import BenchConfig
from quantcli.measure.speed import bench as run_bench


@handle_errors
def bench(
    model: str = typer.Argument("stories260K", help="A quantcli output folder, any local checkpoint, or a Hub id."),
    base: str | None = typer.Option(
        None, "--base", help="Also bench this model and report speedup ratios (MODEL over BASE)."
    ),
    prompt_tokens: int = typer.Option(
        128, "--prompt-tokens", help="Prompt length (prefill), taken from the eval text."
    ),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Greedy tokens decoded with the KV cache."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs; medians are reported."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    backend: str = BACKEND_OPTION,
    min_speedup: float | None = typer.Option(
        None, "--min-speedup", help="CI gate: exit 4 if MODEL decodes less than X times faster than --base."
    ),
    device: str = DEVICE_OPTION,
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Prefill and decode tokens/s, latency per token and memory (medians over repeats)."""

    config = BenchConfig(prompt_tokens, new_tokens, repeats, warmup, backend=backend)
    result = run_bench(
        model, config, base, device, GateLimits(min_speedup=min_speedup), render.RichProgress(enabled=not quiet)
    )
    render.print_json(result) if json_output else render_bench(result)
    enforce(result["gates"])
