"""``quantcli compare``: one table across checkpoints (Rich, Markdown or JSON) and an optional plot."""

from __future__ import annotations

from pathlib import Path

import typer

from quantcli.cli import render
from quantcli.cli.boundary import handle_errors
from quantcli.cli.options import JSON_OPTION, QUIET_OPTION
from quantcli.cli.render_measurements import render_compare
from quantcli.config.quantize import DEFAULT_EVAL_DATASET, EvalConfig
from quantcli.measure.compare import compare as run_compare
from quantcli.measure.compare import markdown as to_markdown


@handle_errors
def compare(
    dirs: list[Path] = typer.Argument(..., help="quantcli output folders."),
    base: str | None = typer.Option(
        None,
        "--base",
        help="Re-evaluate every folder against this model (perplexity change, KL, top-1) on one setting.",
    ),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens evaluated per model when evaluating."),
    seq_len: int = typer.Option(256, "--seq-len", help="Context length when evaluating."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a GitHub Markdown table (for PR comments)."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also draw size vs perplexity and per-layer error to this PNG (needs matplotlib)."
    ),
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """One table across quantized checkpoints: size, bits/weight, perplexity, change vs base, KL."""

    config = EvalConfig(DEFAULT_EVAL_DATASET, seq_len, None, max_tokens)
    result = run_compare(list(dirs), base, config, plot, render.RichProgress(enabled=not quiet))
    if json_output:
        render.print_json(result)
    elif markdown:
        print(to_markdown(result))
    else:
        render_compare(result)
