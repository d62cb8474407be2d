"""SIGTERM and SIGHUP (CI cancellation, ``timeout``, ``docker stop``, Kubernetes, a closed terminal)
end a run exactly like Ctrl-C: the staging folder is removed (or kept for ``--resume``), one line is
printed, and the exit code is 128 + the signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

HANDLED = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class SignalInterrupt(KeyboardInterrupt):
    """A termination signal, raised where Python is running so every cleanup path sees an interrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(HANDLED.get(signum, str(signum)))
        self.signum = signum


def exit_code(error: BaseException) -> int:
    return 128 + getattr(error, "signum", signal.SIGINT)


def describe(error: BaseException) -> str:
    return f" by {HANDLED[error.signum]}" if isinstance(error, SignalInterrupt) else ""


def _raise(signum: int, frame: Any) -> None:
    for other in HANDLED:  # a second TERM/HUP must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    raise SignalInterrupt(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise :class:`SignalInterrupt` (an ignored signal, as under
    ``nohup``, stays ignored); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in HANDLED:
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN:
            previous[signum] = current
            signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
