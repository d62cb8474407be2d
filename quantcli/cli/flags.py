"""The command line's flag for each option a library message names (:func:`quantcli.errors.option`).

A config path finds its flag among the running command's options, then the other commands':
``calibration.samples`` is ``--calib-samples``, ``calibration.seq_len`` is ``--seq-len``, ``eval.dataset``
is ``--eval-dataset`` under ``quantize`` and ``--dataset`` under ``eval``. A value follows the flag
(``--bits 3``); True is the flag alone, False its negative form (``--asymmetric``) and None the ``--no-``
switch (``eval=None`` is ``--no-eval``). The flags are read from the Typer commands, not kept in a
table: tests/cli/test_option_names.py checks that every option the library names is found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from quantcli.errors import NO_VALUE, QuantCliError, python_name, render_options

SECTION_PREFIXES = {"calibration": "calib-", "eval": "eval-"}  # --calib-samples, --eval-dataset
SECTION_FLAGS = {"allocation": "--target-*"}  # a section named as a whole: the flags that turn it on


def flag(path: str, value: Any, commands: Sequence[Any]) -> str | None:
    """``path`` (set to ``value``) as the first of ``commands`` (click commands) that has it spells it, or None."""
    if path in SECTION_FLAGS:
        return SECTION_FLAGS[path]
    section, _, name = path.rpartition(".")
    dashed = name.replace("_", "-")
    if value is None:
        wanted = [f"--no-{dashed}"]
    else:
        wanted = [f"--{SECTION_PREFIXES[section]}{dashed}"] if section in SECTION_PREFIXES else []
        wanted.append(f"--{dashed}")
    for command in commands:
        for spelling in wanted:
            for param in command.params:
                if spelling in param.opts:
                    return _with_value(param, spelling, value)
    return None


def _with_value(param: Any, spelling: str, value: Any) -> str:
    if value is NO_VALUE or value is None or value is True:
        return spelling
    if value is False and param.secondary_opts:
        return param.secondary_opts[0]
    return f"{spelling} {value}"


_PROGRAM: list[Any] = []  # the Typer app, registered by quantcli.cli.app when it is assembled


def register_program(app: Any) -> None:
    """Name flags from ``app``'s commands (the app registers itself; this module never imports it)."""
    _PROGRAM[:] = [app]


def program_commands(running: Callable[..., Any] | None = None) -> list[Any]:
    """The click commands of ``quantcli``, the one whose callback is ``running`` first."""
    import typer.main

    if not _PROGRAM:
        return []
    app = _PROGRAM[0]
    commands = dict(typer.main.get_command(app).commands)
    for info in app.registered_commands:
        if info.callback is running and running is not None:
            first = commands.pop(info.name or typer.main.get_command_name(running.__name__))
            return [first, *commands.values()]
    return list(commands.values())


def cli_text(message: str | QuantCliError, running: Callable[..., Any] | None = None) -> str:
    """A library message with its options named as flags, those of the command ``running`` first."""
    commands = program_commands(running)

    def namer(path: str, value: Any) -> str:
        return flag(path, value, commands) or python_name(path, value)

    return message.render(namer) if isinstance(message, QuantCliError) else render_options(message, namer)
