"""Checks on the output location, made before any work: it must not hold or lie inside the input
model, ``--force`` replaces only a folder quantcli wrote (or an empty one), and it must be writable."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from quantcli.checkpoint.metadata import METADATA_FILE
from quantcli.errors import InputError, OutputExistsError, OutputWriteError, option


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_not_input(target: Path, source: str) -> None:
    """Refuse an output that is, contains or lies inside the (local) input model, through any spelling."""
    if not Path(source).exists():
        return
    out, model = _real(target), _real(source)
    if out == model:
        raise InputError(f"output {target} is the input model's folder. Choose another {option('output')}.")
    if _contains(out, model):
        raise InputError(
            f"output {target} contains the input model {source}; replacing it would delete the model. Choose another "
            f"{option('output')}."
        )
    if _contains(model, out):
        raise InputError(
            f"output {target} lies inside the input model {source}. Choose an {option('output')} outside it."
        )


def check_replaceable(target: Path) -> None:
    """``--force`` replaces only a folder quantcli wrote (it holds quantcli.json) or an empty one."""
    if target.is_symlink():
        raise InputError(
            f"output {target} is a symbolic link; {option('force', True)} replaces only real folders. Pass the folder "
            f"it points to, or another {option('output')}."
        )
    if not target.is_dir():
        raise InputError(f"output {target} exists and is not a folder. Choose another {option('output')}.")
    try:
        empty = not any(target.iterdir())
    except OSError as error:
        raise OutputWriteError(
            f"cannot read output folder {target}: {error.strerror or error}. Choose another {option('output')}."
        ) from None
    if not empty and not (target / METADATA_FILE).is_file():
        raise InputError(
            f"output {target} exists and was not written by quantcli (no {METADATA_FILE}); {option('force', True)} "
            "replaces only"
            f" quantcli output folders or empty ones. Remove it yourself or choose another {option('output')}."
        )


def check_writable(target: Path, name: str = "output") -> None:
    """Create and remove a probe folder where the output will go, so a read-only, full-permission or
    special location (``/proc``) fails now, not after loading and quantizing."""
    parent = _real(target).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(
            f"cannot create {option(name)} {target}: {parent} is a file, not a folder. Choose another {option(name)}."
        )
    try:
        probe = tempfile.mkdtemp(prefix=".quantcli-probe-", dir=parent)
        with open(os.path.join(probe, "probe"), "wb") as handle:
            handle.write(b"x")
        os.remove(os.path.join(probe, "probe"))
        os.rmdir(probe)
    except OSError as error:
        why = error.strerror or str(error)
        if error.errno in (errno.EROFS,):
            why = "read-only file system"
        raise OutputWriteError(
            f"cannot write {option(name)} {target}: creating a file in {parent} failed ({why}). Choose a writable "
            f"{option(name)}."
        ) from None


def check_output_location(target: Path, force: bool, source: str) -> None:
    """All output checks for ``quantize``, in the order a user would want to hear them."""
    check_not_input(target, source)
    if _contains(_real(target), _real(os.getcwd())):
        raise InputError(
            f"output {target} is the current folder or holds it; it cannot be replaced while in use. Choose another "
            f"{option('output')}."
        )
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(
                f"output folder {target} already exists. Pass {option('force', True)} to replace it, or choose another "
                f"{option('output')}."
            )
        check_replaceable(target)
    check_writable(target)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give every file in ``folder`` the mode a newly created file gets (safetensors writes weights 0600,
    which a server running as another user cannot read)."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
