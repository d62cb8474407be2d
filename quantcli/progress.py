"""The progress interface the library reports long work through (the CLI draws it with Rich)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Advance]:
        """A context for one stage; call the yielded function with how many units were done."""
        ...


class NullProgress:
    """Reports nothing: the default for library calls."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda advance: None
