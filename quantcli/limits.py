"""Bounds on everything a user hands quantcli: file sizes, numbers, and the values echoed in messages.

A number past these bounds would exhaust memory or overflow a generator long before it could be
useful, so it is refused up front with the bound in the message.
"""

from __future__ import annotations

import math
import reprlib
import stat
from pathlib import Path
from typing import Any

from quantcli.errors import InputError, option

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines
MAX_DATASET_BYTES = 2 << 30  # read into memory whole
MAX_METADATA_BYTES = 64 << 20  # quantcli.json / report.json: a per-layer map, kilobytes in practice
MAX_SEQ_LEN = 1 << 20
MAX_SAMPLES = 100_000
MAX_CALIB_TOKENS = 1 << 26  # samples x seq_len: 512 MiB of int64 ids
MAX_BATCH = 4096
MAX_TOKENS = 1 << 40
MAX_NEW_TOKENS = 1 << 16
MAX_REPEATS = 1000
MAX_SEED = (1 << 32) - 1

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2
_SHORT.maxlong = 40


def shown(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters, without building the full text of a huge value."""
    return _SHORT.repr(value)


def clip_message(text: str, limit: int = 1000) -> str:
    """A message kept to ``limit`` characters: its start and its end (where the fix is) survive."""
    text = " ".join(str(text).split()) if "\n" in str(text) else str(text)
    return text if len(text) <= limit else f"{text[: limit * 2 // 3]} ... {text[-limit // 3 :]}"


def check_count(name: str, value: Any, most: int, least: int = 1) -> None:
    """An integer in ``[least, most]``."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
        raise InputError(f"{name} must be an integer from {least:,} to {most:,}, got {shown(value)}.")


def check_finite(name: str, value: Any) -> None:
    """A real, finite number (NaN and inf are not limits)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite, non-negative number, got {shown(value)}.")


def read_bounded(path: Path, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``/dev/zero`` and folders are refused)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}.") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a folder, not a file. Pass the file itself.")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file (a device, pipe or socket). Pass a file.")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InputError(
            f"{what} {path} is larger than {limit:,} bytes, more than quantcli reads. Pass a smaller file."
        )
    return data


def check_dataset_file(path: Path, spec: str) -> None:
    """A local dataset path that exists must be a regular file of bounded size (not a folder or device)."""
    try:
        info = path.stat()
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"dataset {spec} is a folder, not a file. Pass a .txt/.jsonl/.csv/.parquet file inside it.")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"dataset {spec} is not a regular file (a device, pipe or socket). Pass a text file.")
    if info.st_size > MAX_DATASET_BYTES:
        raise InputError(
            f"dataset {spec} is {info.st_size / 2**30:.1f} GiB; quantcli reads at most {MAX_DATASET_BYTES >> 30} GiB. "
            "Pass a slice of it (e.g. head -c 500M)."
        )


def bound_calibration(config: Any) -> None:
    check_count(f"calibration samples ({option('calibration.samples')})", config.samples, MAX_SAMPLES)
    check_count(f"calibration sequence length ({option('calibration.seq_len')})", config.seq_len, MAX_SEQ_LEN)
    check_count(f"calibration seed ({option('calibration.seed')})", config.seed, MAX_SEED, least=0)
    if config.samples * config.seq_len > MAX_CALIB_TOKENS:
        raise InputError(
            f"{option('calibration.samples')} {config.samples:,} x {option('calibration.seq_len')} {config.seq_len:,} "
            f"is {config.samples * config.seq_len:,} calibration tokens,"
            f" more than {MAX_CALIB_TOKENS:,}. Use fewer samples or shorter windows."
        )


def bound_eval(config: Any) -> None:
    check_count(f"eval sequence length ({option('eval.seq_len')})", config.seq_len, MAX_SEQ_LEN)
    check_count(f"max tokens ({option('eval.max_tokens')})", config.max_tokens, MAX_TOKENS)
    check_count(f"batch size ({option('eval.batch_size')})", config.batch_size, MAX_BATCH)


def bound_bench(config: Any) -> None:
    check_count(option("prompt_tokens"), config.prompt_tokens, MAX_SEQ_LEN)
    check_count(option("new_tokens"), config.new_tokens, MAX_NEW_TOKENS)
    check_count(option("repeats"), config.repeats, MAX_REPEATS)
    check_count(option("warmup"), config.warmup, MAX_REPEATS, least=0)
