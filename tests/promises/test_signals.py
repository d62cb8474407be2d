"""SIGTERM and SIGHUP (CI cancellation, timeout, docker stop, Kubernetes, a closed terminal) end a run
like Ctrl-C: the staging folder is removed, one line is printed, and the exit code is 128 + signal."""

from __future__ import annotations

import signal

import pytest

from tests.checkpoint.test_atomic import _assert_complete, _signal_during_save


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_termination_signals_during_save_write_nothing(tmp_path, sig, code, name):
    result, signalled = _signal_during_save(tmp_path, sig)
    if not signalled:  # the run finished before its save could be caught: then it must be whole
        _assert_complete(tmp_path / "out")
        pytest.skip(f"the run finished (exit {result.returncode}) before a shard was seen")
    assert result.returncode == code, result.stderr
    assert result.stderr == f"interrupted by {name}: nothing was written.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
