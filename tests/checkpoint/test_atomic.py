"""Atomic output: a killed, interrupted or disk-full run never leaves a half-written checkpoint."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantcli.checkpoint.atomic import atomic_folder, clean_stale
from quantcli.checkpoint.metadata import read_metadata
from tests.conftest import tmpfs
from tests.support.models import REPO

ROOT = REPO
QUANTIZE = [sys.executable, "-m", "quantcli", "quantize", "--bits", "4", "--method", "rtn", "--no-eval", "-q"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "QUANTCLI_DEBUG": ""}


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _default_sigint() -> None:
    """Signals as in a terminal: a background job of a non-interactive shell (``cmd &``) inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all; under ``nohup``
    SIGHUP is ignored too, and quantcli keeps an ignored signal ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _signal_during_save(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, bool]:
    """Start a quantize run writing many small shards and send ``sig`` once its staging folder appears.

    The run is frozen with SIGSTOP the moment a shard shows up, so a signal Python handles between
    bytecodes (SIGINT) cannot arrive after the save has finished; SIGCONT lets it act."""
    process = subprocess.Popen(
        [*QUANTIZE, "-o", "out", "--max-shard-size", "8KB"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline, signalled = time.monotonic() + 120, False
    while process.poll() is None and time.monotonic() < deadline:
        staging = list(tmp_path.glob(".out.partial-*"))
        if staging and any(staging[0].glob("*.safetensors")):
            process.send_signal(signal.SIGSTOP)
            signalled = process.poll() is None
            process.send_signal(sig)
            process.send_signal(signal.SIGCONT)
            break
        time.sleep(0.002)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), signalled


def _assert_complete(folder: Path) -> None:
    assert read_metadata(folder)["format_version"] >= 1
    assert (folder / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_sigint_during_save_writes_nothing_and_exits_130(tmp_path):
    result, signalled = _signal_during_save(tmp_path, signal.SIGINT)
    if not signalled:  # the run finished before its save could be caught: then it must be whole
        _assert_complete(tmp_path / "out")
        pytest.skip(f"the run finished (exit {result.returncode}) before a shard was seen")
    assert result.returncode == 130, result.stderr
    assert result.stderr == "interrupted: nothing was written.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigkill_during_save_leaves_no_target_and_next_run_cleans_up(tmp_path):
    result, signalled = _signal_during_save(tmp_path, signal.SIGKILL)
    if not signalled:
        _assert_complete(tmp_path / "out")
        pytest.skip(f"the run finished (exit {result.returncode}) before a shard was seen")
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1  # SIGKILL cannot be caught: the staging folder stays, the target does not exist

    rerun = subprocess.run([*QUANTIZE, "-o", "out", "--json"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert read_metadata(tmp_path / "out")["method"] == "rtn"


def test_clean_stale_removes_dead_staging_and_restores_retired_output(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".out.partial-{alive}").mkdir()  # a run still going: left alone
    retired = tmp_path / f".out.old-{dead}"
    retired.mkdir()
    (retired / "quantcli.json").write_text('{"format_version": 1}')
    (tmp_path / ".other.partial-1").mkdir()  # another target's staging folder: left alone

    clean_stale(tmp_path / "out")

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f".out.partial-{alive}", ".other.partial-1", "out"])
    assert read_metadata(tmp_path / "out") == {"format_version": 1}


def test_failure_inside_atomic_folder_keeps_the_old_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(RuntimeError), atomic_folder(target, force=True) as staging:
        (staging / "half.safetensors").write_bytes(b"x" * 10)
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "old.txt").read_text() == "keep me"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_file_size_limit_gives_one_clear_line_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [*QUANTIZE, "-o", "out"], cwd=tmp_path, env=_env(), capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: the disk is full (or the file size limit was hit) while writing out")
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_full_disk_gives_one_clear_line_and_writes_nothing(tmp_path):
    with tmpfs(tmp_path / "disk", "size=200k") as disk:
        result = subprocess.run([*QUANTIZE, "-o", str(disk / "out")], env=_env(), capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.startswith("error: the disk is full")
        assert result.stderr.count("\n") == 1
        assert list(disk.iterdir()) == []
