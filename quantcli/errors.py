"""Typed errors. Each carries the fix in its message and the exit code the CLI returns.

Messages name an option with :func:`option` (``option("calibration.seq_len")``, ``option("bits", 3)``)
rather than by a command-line flag: ``str(error)`` shows the Python name, which is also the recipe key
(``calibration.seq_len``, ``bits=3``), and the CLI's error boundary shows the flag (``--seq-len``,
``--bits 3``; quantcli.cli.flags). Method options are named bare (``group_size``), as in a recipe.

Exit codes: :data:`EXIT_CODES`, the one table (``quantcli --help`` and the README show it).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from typing import Any

EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it; QUANTCLI_DEBUG=1 shows the traceback)",
    2: "bad input: options, paths, recipes, an output that cannot be written or holds an input, an option the run "
    "would not honour, a resume state that does not match, stdout closed or full",
    3: "a model, checkpoint or dataset could not be loaded, or does not match its config or quantcli.json",
    4: "a quality gate failed (a maximum perplexity increase, size or minimum speedup)",
    5: "the method, backend or device is not available here, or memory ran out",
    129: "stopped by SIGHUP (terminal closed); nothing was written",
    130: "interrupted by Ctrl-C; nothing was written (a streamed run keeps its finished blocks to resume)",
    143: "stopped by SIGTERM (timeout, CI cancel, docker stop); nothing was written",
}

NO_VALUE: Any = object()  # an option named without a value
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: never in a repr()-shown value
_TOKEN = re.compile(f"{_OPEN}([A-Za-z_][\\w.]*)(?:=([^{_CLOSE}]*))?{_CLOSE}")
OptionNamer = Callable[[str, Any], str]  # (config path, value or NO_VALUE) -> the option's name for this reader


def option(path: str, value: Any = NO_VALUE) -> str:
    """A token naming the option at ``path`` (with ``value``: the option set to it) in a message."""
    if value is NO_VALUE:
        return f"{_OPEN}{path}{_CLOSE}"
    if (
        not isinstance(value, (bool, int, float, str, type(None)))
        or isinstance(value, float)
        and not math.isfinite(value)
    ):
        value = str(value)  # literal_eval reads back only literals
    return f"{_OPEN}{path}={ascii(value)}{_CLOSE}"


def python_name(path: str, value: Any = NO_VALUE) -> str:
    """How Python code and recipes name an option: ``calibration.seq_len``, ``bits=3``, ``eval=None``."""
    return path if value is NO_VALUE else f"{path}={value!r}"


def render_options(text: str, namer: OptionNamer) -> str:
    """``text`` with each :func:`option` token named by ``namer``."""
    return _TOKEN.sub(
        lambda m: namer(m.group(1), NO_VALUE if m.group(2) is None else ast.literal_eval(m.group(2))), text
    )


class QuantCliError(Exception):
    """Base class for every error the library raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        return render_options(super().__str__(), python_name)

    def render(self, namer: OptionNamer) -> str:
        """The message with its options named by ``namer`` (the CLI passes its flags)."""
        return render_options(super().__str__(), namer)


class InputError(QuantCliError):
    """A bad option value, config file or path given by the user."""

    exit_code = 2


class OutputExistsError(InputError):
    """The output folder exists and --force was not given."""


class OutputWriteError(InputError):
    """The output folder could not be written (disk full, file size limit, permissions)."""


class ResumeStateError(InputError):
    """--resume found a staging folder it cannot trust (other settings or sources, a changed shard); the
    staging folder is kept."""


class ModelLoadError(QuantCliError):
    """A model or tokenizer could not be found or read."""

    exit_code = 3


class CheckpointError(ModelLoadError):
    """A quantized checkpoint is corrupt, truncated or from a newer quantcli."""


class DatasetError(QuantCliError):
    """A dataset could not be read, or holds too little text for the settings."""

    exit_code = 3


class GateFailedError(QuantCliError):
    """A quality gate (--max-ppl-increase, --max-size, --min-speedup) was not met."""

    exit_code = 4


class UnavailableError(QuantCliError):
    """The method, backend or device asked for cannot run on this machine."""

    exit_code = 5


class ResumableInterrupt(QuantCliError):
    """Ctrl-C during a --low-memory (streaming) run: the finished layers are kept for --resume."""

    exit_code = 130
