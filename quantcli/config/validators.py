"""Checks shared by every config: sizes, types, positive counts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quantcli.errors import InputError, option
from quantcli.limits import shown

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: Any) -> int:
    """Bytes in a size such as ``"200KB"``, ``"2GB"`` or ``"5GiB"`` (transformers' ``max_shard_size`` units)."""
    size = 0
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(value), re.IGNORECASE)
        if match and len(match.group(1)) < 30:
            size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise InputError(f"{option('max_shard_size')} must be a size such as 200KB, 500MB or 2GB, got {shown(value)}.")
    return size


_TYPE_WORDS = {int: "an integer", bool: "true or false", str: "a string", Path: "a path", type(None): "null"}


def check_type(name: str, value: Any, *kinds: type) -> None:
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        wanted = " or ".join(_TYPE_WORDS.get(kind, kind.__name__) for kind in kinds)
        raise InputError(f"{name} must be {wanted}, got {shown(value)}.")


def check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {shown(value)}.")
