"""Name the real cause of a library error in quantcli's one line, and keep libraries' own error
logs (``datasets`` prints "Failed to read file ...") from leaking above it."""

from __future__ import annotations

import logging


def root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost exception ``error`` was raised from (``raise ... from``)."""
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def quiet_datasets() -> None:
    """The datasets library logs its read errors itself; quantcli reports them in its own line."""
    import datasets

    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
