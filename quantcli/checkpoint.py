"""Write checkpoints atomically and load any quantcli output (or a plain checkpoint) back.

Every quantcli output folder is a standard Hugging Face checkpoint (safetensors + config.json with
its ``quantization_config``) that transformers loads without quantcli, plus ``quantcli.json``:
the method, its settings, the per-layer map and the format version, so ``eval DIR`` needs no flags.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from quantcli.errors import CheckpointError, InputError, OutputExistsError, QuantCliError

FORMAT_VERSION = 1
METADATA_FILE = "quantcli.json"
REPORT_FILE = "report.json"


def check_output(target: Path, force: bool, source: str) -> None:
    """Fail early, before any work, when writing ``target`` would clobber something."""
    if Path(source).exists() and target.resolve() == Path(source).resolve():
        raise InputError(f"output {target} is the input model's folder. Choose another --output.")
    if target.exists() and not force:
        raise OutputExistsError(f"output folder {target} already exists. Pass --force to replace it, or choose another --output.")
    if target.exists() and not target.is_dir():
        raise InputError(f"output {target} exists and is not a folder. Choose another --output.")


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` only if the block succeeds.

    On any failure, Ctrl-C included, the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            if not force:
                raise OutputExistsError(f"output folder {target} appeared while quantizing. Pass --force to replace it.")
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise QuantCliError(f"the disk is full while writing {target}; nothing was written. Free space or choose another --output.") from error
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """``quantcli.json`` of ``folder``, validated; None for a checkpoint quantcli did not write."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}). Re-run quantcli quantize to rewrite the checkpoint.") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("format_version"), int):
        raise CheckpointError(f"{path} has no format_version. Re-run quantcli quantize to rewrite the checkpoint.")
    if metadata["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata['format_version']}, newer than this quantcli reads ({FORMAT_VERSION})."
            " Upgrade quantcli: pip install -U quantcli."
        )
    return metadata


BACKENDS = ("auto", "int8-cpu")


def load(path: str | Path, device: str = "auto", trust_remote_code: bool = False, backend: str = "auto") -> tuple[Any, Any, dict[str, Any] | None]:
    """Load a checkpoint quantcli wrote (or any causal LM): ``(model, tokenizer, metadata)``.

    ``backend="int8-cpu"`` runs an RTN INT8 checkpoint with torch's int8 kernels on CPU (see
    :mod:`quantcli.int8cpu`); ``"auto"`` runs every checkpoint with dequantized weights.
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    model, tokenizer, metadata = _load(path, device, trust_remote_code)
    if backend == "int8-cpu":
        from quantcli.int8cpu import convert

        model = convert(model, metadata, str(next(model.parameters()).device))
    return model, tokenizer, metadata


def _load(path: str | Path, device: str, trust_remote_code: bool) -> tuple[Any, Any, dict[str, Any] | None]:
    from quantcli.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model

    source = resolve_model(str(path))
    metadata = read_metadata(Path(source)) if Path(source).is_dir() else None
    device = pick_device(device)
    tokenizer = load_tokenizer(source, trust_remote_code)
    if metadata is None or metadata.get("format") == "dense":
        dtype = "auto" if metadata else pick_dtype("auto", device)
        return load_model(source, dtype, device, trust_remote_code), tokenizer, metadata
    if metadata.get("format") == "compressed-tensors":
        from quantcli.compressed import load_compressed

        return load_compressed(source, device), tokenizer, metadata
    return load_model(source, "auto", device, trust_remote_code), tokenizer, metadata


def inspect(path: str | Path) -> dict[str, Any]:
    """The metadata of a quantcli checkpoint (method, bits, per-layer map) plus its size on disk."""
    from quantcli.models import bytes_on_disk, weight_files

    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{path} is not a folder. Pass the output folder of quantcli quantize.")
    metadata = read_metadata(folder)
    if metadata is None:
        raise CheckpointError(f"{path} has no {METADATA_FILE}: it was not written by quantcli quantize. Use quantcli eval for any checkpoint.")
    return {**metadata, "disk_bytes": bytes_on_disk(weight_files(str(folder)))}
