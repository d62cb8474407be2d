"""The CLI's error boundary: a library error becomes one stderr line and its documented exit code
(:mod:`quantcli.errors`); a signal becomes 128 + its number; anything else is an internal error (exit 1).
``QUANTCLI_DEBUG=1`` lets the traceback through."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from quantcli.checkpoint.conditions import documented_conditions
from quantcli.cli.flags import cli_text
from quantcli.cli.render import tolerate_terminal_encoding
from quantcli.cli.signals import describe, exit_code, terminate_as_interrupt
from quantcli.errors import QuantCliError
from quantcli.limits import clip_message


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one stderr line and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("QUANTCLI_DEBUG", "") not in ("", "0")

        tolerate_terminal_encoding()
        if not debug:  # quantcli draws its own progress; keep the libraries' bars and chatter off stderr
            os.environ.setdefault("TQDM_DISABLE", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

        try:
            with terminate_as_interrupt(), documented_conditions():
                return command(*args, **kwargs)
        except (typer.Exit, typer.TyperException):  # usage errors keep Typer's standard format
            raise
        except QuantCliError as error:
            if debug:
                raise

            print(f"error: {clip_message(cli_text(error, wrapper))}", file=sys.stderr)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as error:  # Ctrl-C, SIGTERM, SIGHUP
            print(f"interrupted{describe(error)}: nothing was written.", file=sys.stderr)
            raise typer.Exit(exit_code(error)) from None
        except Exception as error:
            if debug:
                raise

            print(
                f"internal error: {type(error).__name__}: {clip_message(str(error), 400)}. Set QUANTCLI_DEBUG=1 for "
                "the traceback and report it.",
                file=sys.stderr,
            )
            raise typer.Exit(1) from None

    return wrapper
