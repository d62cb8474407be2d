"""``quantcli inspect``: what a quantized checkpoint holds, from its quantcli.json."""

from __future__ import annotations

from pathlib import Path

import typer

from quantcli.checkpoint.load import inspect as inspect_checkpoint
from quantcli.cli import render
from quantcli.cli.boundary import handle_errors
from quantcli.cli.options import JSON_OPTION


@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A quantcli output folder."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Method, bits, per-layer map and size of a quantized checkpoint."""

    info = inspect_checkpoint(path)
    render.print_json(info) if json_output else render.render_inspect(info)
