"""Typed errors. Each carries the fix in its message and the exit code the CLI returns.

Exit codes (documented in the README):
    0 success · 1 internal error (a bug: please report it) · 2 bad input (options, paths, configs)
    3 a model, checkpoint or dataset could not be loaded · 4 a quality gate failed
    5 the chosen method or device is not available here · 130 interrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP)
"""

from __future__ import annotations


class QuantCliError(Exception):
    """Base class for every error the library raises on purpose."""

    exit_code = 1


class InputError(QuantCliError):
    """A bad option value, config file or path given by the user."""

    exit_code = 2


class OutputExistsError(InputError):
    """The output folder exists and --force was not given."""


class OutputWriteError(InputError):
    """The output folder could not be written (disk full, file size limit, permissions)."""


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
