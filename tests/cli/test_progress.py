"""The CLI's progress bars: on stderr, with units done of the total and the time left."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from quantcli.cli import render as console


def test_progress_shows_units_done_and_time_left(monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(console, "stderr", Console(file=terminal, force_terminal=True, color_system=None, width=120))
    with console.RichProgress().task("quantize (gptq)", total=210) as advance:
        for _ in range(15):
            advance(1)
            time.sleep(0.02)
        time.sleep(0.3)  # a few refreshes with 15 of 210 done
        shown = terminal.getvalue()
    assert "15/210" in shown
    left = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in re.findall(r"eta (\d+):(\d\d):(\d\d)", shown)]
    assert left and max(left) >= 1  # 195 layers to go at ~50 layers/s


def test_progress_is_silent_off_a_terminal(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr(console, "stderr", Console(file=pipe))
    with console.RichProgress().task("quantize (gptq)", total=3) as advance:
        advance(3)
    assert pipe.getvalue() == ""
