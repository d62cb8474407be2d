"""The ``quantcli`` program: assembles the commands (one module each) into one Typer app.

Each command parses options, builds a config, calls one library function and renders the result; heavy
imports happen inside commands so ``--help`` stays fast."""

from __future__ import annotations

import typer

from quantcli import __version__
from quantcli.cli.bench import bench
from quantcli.cli.compare import compare
from quantcli.cli.evaluate import eval_command
from quantcli.cli.flags import register_program
from quantcli.cli.helptext import add_help_sections
from quantcli.cli.inspect import inspect
from quantcli.cli.methods import methods
from quantcli.cli.quantize import quantize

app = typer.Typer(
    help="Quantize Hugging Face causal LMs to INT8/INT4 and measure size, perplexity and speed.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Quantize Hugging Face causal LMs to INT8/INT4 and measure size, perplexity and speed."""


app.command()(quantize)
app.command("eval")(eval_command)
app.command()(inspect)
app.command()(compare)
app.command()(bench)
app.command()(methods)
add_help_sections(app)
register_program(app)


def main() -> None:
    app()
