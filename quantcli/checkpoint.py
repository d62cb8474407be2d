"""Write checkpoints atomically and load any quantcli output (or a plain checkpoint) back.

Every quantcli output folder is a standard Hugging Face checkpoint (safetensors + config.json with
its ``quantization_config``) that transformers loads without quantcli, plus ``quantcli.json``:
the method, its settings, the per-layer map and the format version, so ``eval DIR`` needs no flags.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from quantcli.errors import CheckpointError, InputError, ModelLoadError, OutputExistsError, OutputWriteError, QuantCliError, ResumableInterrupt

FORMAT_VERSION = 1
METADATA_FILE = "quantcli.json"
REPORT_FILE = "report.json"
RESUME_FILE = "resume.json"  # in the staging folder of a --low-memory run: the settings and finished shards


def check_output(target: Path, force: bool, source: str, resume: bool = False) -> None:
    """Fail early, before any work, when writing ``target`` would clobber something."""
    from quantcli.paths import check_not_input, check_output_location

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
        error = error.__cause__ or error.__context__
    return False


def _resumable(target: Path) -> Path | None:
    """The newest staging folder of an interrupted ``--low-memory`` run on ``target`` (its process gone)."""
    found = []
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if (leftover / RESUME_FILE).exists() and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
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
        from quantcli.paths import apply_umask

        apply_umask(staging)
        if target.exists():
            if not force:
                raise OutputExistsError(f"output folder {target} appeared while quantizing. Pass --force to replace it.")
            from quantcli.paths import check_replaceable

            check_replaceable(target)
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException as error:
        if not (isinstance(error, (KeyboardInterrupt, ResumableInterrupt)) and (staging / RESUME_FILE).exists()):
            shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(error):
            raise OutputWriteError(
                f"the disk is full (or the file size limit was hit) while writing {target}; nothing was written."
                " Free space or choose another --output."
            ) from error
        if isinstance(error, OSError) and _under(error.filename, target.parent):
            raise OutputWriteError(f"cannot write {target}: {error.strerror or error}; nothing was written. Choose another --output.") from error
        raise


def _under(filename: Any, folder: Path) -> bool:
    """Whether an OSError's file lies in ``folder`` (the output's side), not in the model or data being read."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    path = Path(os.fsdecode(filename)).resolve()
    return path.is_relative_to(Path(folder).resolve())


def write_json(path: Path, data: Any) -> None:
    from quantcli.finite import dumps

    path.write_text(dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """``quantcli.json`` of ``folder``, validated; None for a checkpoint quantcli did not write."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return None
    try:
        from quantcli.limits import MAX_METADATA_BYTES, read_bounded

        metadata = json.loads(read_bounded(path, "checkpoint metadata", MAX_METADATA_BYTES).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is corrupt ({why}). Re-run quantcli quantize to rewrite the checkpoint.") from None
    except InputError as error:
        raise CheckpointError(str(error)) from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}.") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} has no valid format_version. Re-run quantcli quantize to rewrite the checkpoint.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this quantcli reads ({FORMAT_VERSION})."
            " Upgrade quantcli: pip install -U quantcli."
        )
    return metadata


BACKENDS = ("auto", "int8-cpu", "int4-cpu")


def load(
    path: str | Path, device: str = "auto", trust_remote_code: bool = False, backend: str = "auto"
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Load a checkpoint quantcli wrote (or any causal LM): ``(model, tokenizer, metadata)``.

    ``backend="int8-cpu"`` / ``"int4-cpu"`` runs an rtn/gptq INT8 / INT4 checkpoint with torch's
    weight-only integer kernels on CPU (see :mod:`quantcli.cpu_kernels`); ``"auto"`` runs every
    checkpoint with dequantized weights.
    """
    from quantcli.models import check_vocab, load_tokenizer, pick_device, resolve_model

    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")

    source = resolve_model(str(path))
    metadata = read_metadata(Path(source)) if Path(source).is_dir() else None
    if metadata is not None:
        from quantcli.integrity import check_metadata_fields

        check_metadata_fields(metadata, Path(source) / METADATA_FILE)
    device = pick_device(device)
    if backend != "auto":
        from quantcli.cpu_kernels import convert, kernel_layers

        layers = kernel_layers(backend, metadata, device)  # refuse before the model loads
    try:
        model, tokenizer = _load(source, metadata, device, trust_remote_code), load_tokenizer(source, trust_remote_code)
        check_vocab(model, tokenizer, str(path))
        if metadata is not None:
            from quantcli.integrity import check_claims

            check_claims(Path(source), metadata, model)
    except QuantCliError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file makes the readers raise anything; name it
        if "trust_remote_code" in str(error):
            from quantcli.models import REMOTE_CODE_HINT

            raise ModelLoadError(REMOTE_CODE_HINT.format(source=path)) from None
        why = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise CheckpointError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {why}). It is corrupt or incomplete:"
            " re-run quantcli quantize, or download it again."
        ) from error
    if backend != "auto":
        model = convert(model, layers, source, backend)
    return model, tokenizer, metadata


def _integer_weights_only(source: str) -> bool:
    """A compressed-tensors checkpoint (any writer) of integer weights and no activation quantization,
    which the library's own decompressors read; plain transformers cannot build asymmetric ones yet."""
    try:
        quantization = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(quantization, dict) or not isinstance(quantization.get("config_groups"), dict):
        return False
    groups = quantization["config_groups"]
    return quantization.get("quant_method") == "compressed-tensors" and not quantization.get("sparsity_config") and bool(groups) and all(
        isinstance(group, dict) and (group.get("format") or quantization.get("format")) in ("pack-quantized", "int-quantized")
        and not group.get("input_activations") and not group.get("output_activations")
        for group in groups.values()
    )


def _load(source: str, metadata: dict[str, Any] | None, device: str, trust_remote_code: bool) -> Any:
    from quantcli.formats import format_names, get_format
    from quantcli.models import load_model, pick_dtype

    if metadata is None and Path(source).is_dir() and _integer_weights_only(source):
        metadata = {"format": "compressed-tensors"}
    if metadata is None or metadata.get("format") == "dense":
        dtype = "auto" if metadata else pick_dtype("auto", device)
        return load_model(source, dtype, device, trust_remote_code)
    if metadata.get("format") in format_names():
        return get_format(metadata["format"]).load(source, device, trust_remote_code)
    return load_model(source, "auto", device, trust_remote_code)


def inspect(path: str | Path) -> dict[str, Any]:
    """The metadata of a quantcli checkpoint (method, bits, per-layer map) plus its size on disk."""
    from quantcli.models import bytes_on_disk, weight_files

    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{path} is not a folder. Pass the output folder of quantcli quantize.")
    metadata = read_metadata(folder)
    if metadata is None:
        raise CheckpointError(f"{path} has no {METADATA_FILE}: it was not written by quantcli quantize. Use quantcli eval for any checkpoint.")
    from quantcli.integrity import check_metadata_fields

    check_metadata_fields(metadata, folder / METADATA_FILE)
    return {**metadata, "disk_bytes": bytes_on_disk(weight_files(str(folder)))}
