"""safetensors' dtype names: their widths in bytes and the torch dtype names they stand for (one table)."""

from __future__ import annotations

import math
from typing import Any

WIDTHS = {
    "F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FROM_TORCH = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "int32": "I32", "int64": "I64"}


def tensor_bytes(handle: Any, key: str) -> int:
    """Bytes of tensor ``key`` in an open safetensors file, from its header alone."""
    view = handle.get_slice(key)
    return math.prod(view.get_shape()) * WIDTHS.get(view.get_dtype(), 4)
