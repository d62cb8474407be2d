"""Write a checkpoint folder atomically: staged beside the target and renamed into place only when
complete, leftovers of killed runs cleaned, a --low-memory run's staging kept for --resume.
Reading checkpoints back: :mod:`quantcli.checkpoint.load`."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantcli.checkpoint.paths import apply_umask, check_not_input, check_output_location, check_replaceable
from quantcli.errors import OutputExistsError, OutputWriteError, ResumableInterrupt, ResumeStateError, option

RESUME_FILE = "resume.json"  # in the staging folder of a --low-memory run: the settings and finished shards


def check_output(target: Path, force: bool, source: str, resume: bool = False) -> None:
    """Fail early, before any work, when writing ``target`` would clobber something."""
    check_not_input(target, source)
    clean_stale(target, keep_resumable=resume)
    check_output_location(target, force, source)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def clean_stale(target: Path, keep_resumable: bool = False) -> list[Path]:
    """Remove staging folders a killed run left beside ``target`` (``.NAME.partial-PID`` of dead PIDs).

    With ``keep_resumable``, those of interrupted ``--low-memory`` runs (holding ``resume.json``) stay.
    A run killed between retiring the old output and renaming the new one leaves ``.NAME.old-PID``
    and no ``target``: the old output is put back. Returns the folders removed or restored.
    """
    cleaned = []
    for kind in ("partial", "old"):
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if keep_resumable and (leftover / RESUME_FILE).exists():
                continue
            if kind == "old" and not target.exists():
                leftover.rename(target)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
            cleaned.append(leftover)
    return cleaned


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is ENOSPC/EFBIG, including safetensors' own error type."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(text in str(error) for text in ("No space left", "File too large", "Disk quota exceeded")):
            return True
        if isinstance(error, OSError) and error.errno is None and " requested and " in str(error):
            return True  # numpy's short write (a GGUF file), which carries no errno
        error = error.__cause__ or error.__context__
    return False


def _resumable(target: Path) -> Path | None:
    """The newest staging folder of an interrupted ``--low-memory`` run on ``target`` (its process gone)."""
    found = []
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if (
            (leftover / RESUME_FILE).exists()
            and pid.isdigit()
            and (int(pid) == os.getpid() or not _pid_alive(int(pid)))
        ):
            found.append(leftover)
    return max(found, key=lambda path: (path / RESUME_FILE).stat().st_mtime, default=None)


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool, resume: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` only if the block succeeds.

    On any failure the temporary folder is removed and ``target`` is untouched. A SIGKILL can leave
    the staging folder behind; the next run on the same target removes it. ``resume`` adopts the
    staging folder of an interrupted ``--low-memory`` run instead, which also keeps its staging
    folder on Ctrl-C (the block decides what to keep by writing ``resume.json``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    previous = _resumable(target) if resume else None
    if previous is not None and previous != staging:
        shutil.rmtree(staging, ignore_errors=True)
        previous.rename(staging)
    elif previous is None:
        shutil.rmtree(staging, ignore_errors=True)
    clean_stale(target)
    staging.mkdir(exist_ok=True)
    try:
        yield staging

        apply_umask(staging)
        if target.exists():
            if not force:
                raise OutputExistsError(
                    f"output folder {target} appeared while quantizing. Pass {option('force', True)} to replace it."
                )

            check_replaceable(target)
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException as error:
        # finished work a later --resume can use
        keeps = isinstance(error, (KeyboardInterrupt, ResumableInterrupt, ResumeStateError))
        if not (keeps and (staging / RESUME_FILE).exists()):
            shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(error):
            raise OutputWriteError(
                f"the disk is full (or the file size limit was hit) while writing {target}; nothing was written."
                f" Free space or choose another {option('output')}."
            ) from error
        if isinstance(error, OSError) and _under(error.filename, target.parent):
            raise OutputWriteError(
                f"cannot write {target}: {error.strerror or error}; nothing was written. Choose another "
                f"{option('output')}."
            ) from error
        raise


def _under(filename: Any, folder: Path) -> bool:
    """Whether an OSError's file lies in ``folder`` (the output's side), not in the model or data being read."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    path = Path(os.fsdecode(filename)).resolve()
    return path.is_relative_to(Path(folder).resolve())
