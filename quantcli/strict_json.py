"""JSON that every strict parser reads: NaN and infinity become null (bare ``NaN`` is not JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict_json_value(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so ``json.dumps(allow_nan=False)`` succeeds
    (bare ``NaN``/``Infinity`` are not JSON and break every strict parser)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    return json.dumps(strict_json_value(data), allow_nan=False, default=str, **kwargs)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented strict JSON in ``path``."""
    path.write_text(dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
