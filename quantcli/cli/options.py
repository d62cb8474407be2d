"""Options that several commands share, so each is spelled and explained once."""

from __future__ import annotations

from typing import Any

import typer

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout (schema_version inside).")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars on stderr.")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
BACKEND_OPTION = typer.Option(
    "auto",
    "--backend",
    help="auto (dequantized weights), int8-cpu or int4-cpu (torch weight-only integer kernels for rtn/gptq INT8 or INT4"
    " checkpoints on CPU).",
)


def given(**values: Any) -> dict[str, Any]:
    """The options the user set (Typer's None means not given)."""
    return {key: value for key, value in values.items() if value is not None}
