"""A GGUF file gets the same integrity promise as a safetensors checkpoint (issue 25, classes 2 and 3).

* Before any parser reads it, :func:`check_layout` walks the header with bounds: every count, string,
  array and tensor must fit in the bytes that follow, arrays hold scalars or strings (no nesting), a
  tensor has at most four dimensions of a known type and its data lies inside the file. A metadata array
  claiming 2^60 items is refused in microseconds instead of being looped over.
* Before the model is built, :func:`check_blocks`: ``ARCH.block_count`` must equal the ``blk.N`` tensors
  the file holds (one off either way, or 100,000, is refused with the numbers).
* After loading, :func:`check_loaded`: a weight the architecture needs and the file lacks (transformers
  would initialise it at random) and a tensor of the file the model has no place for (transformers
  would drop it) are refused by name, as :mod:`quantcli.sources.integrity` does for safetensors. An architecture
  label that does not fit the tensors shows up here, as missing weights.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError, ModelLoadError
from quantcli.limits import shown
from quantcli.sources.integrity import check_loading_info

SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 1 << 16
IGNORED = ("rope_freqs.weight",)  # llama.cpp's precomputed RoPE factors: transformers computes its own
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class _Bad(Exception):
    """What is wrong with the header, for the one-line message."""


class _Cursor:
    def __init__(self, data: Any) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise _Bad(
                f"{size:,} bytes asked at offset {self.at:,}, past the end of the file ({len(self.data):,} bytes)"
            )
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def number(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int | None = None) -> bytes:
        size = self.number("Q")
        if limit is not None and size > limit:
            raise _Bad(f"a name of {size:,} bytes at offset {self.at:,}")
        return self.take(size)

    def left(self) -> int:
        return len(self.data) - self.at


def _corrupt(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"cannot read the GGUF file {path} ({why}): it is corrupt or truncated. Download it again.")


def check_layout(path: Path) -> None:
    """Walk the header of ``path`` with bounds before the ``gguf`` package's reader sees it."""
    import gguf

    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _walk(_Cursor(data), gguf.GGML_QUANT_SIZES)
    except _Bad as error:
        raise _corrupt(path, str(error)) from None
    except (OSError, ValueError) as error:  # an empty file cannot be mapped
        raise _corrupt(path, str(error) or type(error).__name__) from None


def _walk(cursor: _Cursor, sizes: dict[Any, tuple[int, int]]) -> None:
    if cursor.take(4) != b"GGUF":
        raise _Bad("no GGUF magic")
    version = cursor.number("I")
    if version not in (2, 3):
        raise _Bad(f"GGUF version {version}; quantcli reads versions 2 and 3")
    tensors, keys = cursor.number("Q"), cursor.number("Q")
    if keys * 13 > cursor.left() or tensors * 24 > cursor.left():  # the smallest key/value and tensor entries
        raise _Bad(f"{tensors:,} tensors and {keys:,} metadata keys cannot fit in {cursor.left():,} bytes")
    alignment = 32
    for _ in range(keys):
        key = cursor.string(MAX_NAME)
        kind = cursor.number("I")
        value = _value(cursor, kind)
        if key == b"general.alignment":
            if kind != 4 or not value or value & (value - 1):
                raise _Bad(f"general.alignment {value!r} is not a power of two")
            alignment = value
    types = {int(kind): size for kind, size in sizes.items()}
    spans = []
    for _ in range(tensors):
        # quoted, escaped and cut: a damaged name is not text
        name = shown(cursor.string(MAX_NAME).decode("utf-8", "replace"))
        dims = cursor.number("I")
        if not 1 <= dims <= MAX_DIMS:
            raise _Bad(f"tensor {name} has {dims} dimensions")
        shape = [cursor.number("Q") for _ in range(dims)]
        kind, offset = cursor.number("I"), cursor.number("Q")
        if kind not in types:
            raise _Bad(f"tensor {name} has unknown type {kind}")
        block, size = types[kind]
        count = 1
        for n in shape:
            count *= n
        if shape[0] % block or offset % alignment:
            raise _Bad(f"tensor {name} of shape {shape} does not fit its type's blocks or alignment")
        spans.append((name, offset, count // block * size))
    start = -(-cursor.at // alignment) * alignment
    for name, offset, size in spans:
        if start + offset + size > len(cursor.data):
            raise _Bad(
                f"tensor {name} ends at byte {start + offset + size:,}, past the end of the file ({len(cursor.data):,}"
                " bytes)"
            )


def _value(cursor: _Cursor, kind: int) -> Any:
    if kind in SCALARS:
        raw = cursor.take(SCALARS[kind])
        return int.from_bytes(raw, "little") if kind == 4 else None
    if kind == STRING:
        cursor.string()
        return None
    if kind != ARRAY:
        raise _Bad(f"metadata value type {kind} at offset {cursor.at:,}")
    item, count = cursor.number("I"), cursor.number("Q")
    if item in SCALARS:
        cursor.take(count * SCALARS[item])
    elif item == STRING:
        if count * 8 > cursor.left():
            raise _Bad(f"an array of {count:,} strings cannot fit in the {cursor.left():,} bytes left")
        for _ in range(count):
            cursor.string()
    else:
        raise _Bad(f"an array of type {item} at offset {cursor.at:,} (arrays hold numbers or strings)")
    return None


def check_blocks(reader: Any, path: Path) -> None:
    """``ARCH.block_count`` against the ``blk.N`` tensors, before the model is built from it."""
    arch = _text(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"the GGUF file {path} names no general.architecture. Convert the model again.")
    field = reader.fields.get(f"{arch}.block_count")
    try:
        declared = int(field.contents()) if field is not None else None
    except (TypeError, ValueError):
        declared = None
    held = {int(match.group(1)) for tensor in reader.tensors if (match := _BLOCK.match(tensor.name))}
    if declared is None:
        raise CheckpointError(f"the GGUF file {path} has no valid {arch}.block_count. Convert the model again.")
    if held != set(range(declared)):
        holds = f"blocks 0..{max(held)}" if held and held == set(range(max(held) + 1)) else _blocks(held)
        raise CheckpointError(
            f"the GGUF file {path} declares {declared:,} blocks ({arch}.block_count) but holds tensors of {holds}."
            " The file is incomplete or its metadata is wrong: convert the model again."
        )


def _blocks(held: set[int]) -> str:
    listed = sorted(held)
    return (
        "no block" if not listed else "blocks " + ", ".join(map(str, listed[:6])) + (", ..." if len(listed) > 6 else "")
    )


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _text(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    try:
        value = field.contents() if field is not None else None
    except (TypeError, ValueError, IndexError):
        return None
    return value if isinstance(value, str) else None


def check_loaded(model: Any, info: dict[str, Any], reader: Any, path: Path) -> None:
    """Refuse weights the file lacks (random in the model) and tensors the model has no place for."""
    import gguf

    arch = _text(reader, "general.architecture") or ""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"the GGUF file {path} lacks {len(missing)} weight(s) its {arch} architecture needs ({_few(missing)}),"
            " which would be random. The file is incomplete or labelled with another architecture: convert the model "
            "again."
        )
    check_loading_info({"mismatched_keys": info.get("mismatched_keys")}, str(path))
    try:
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    except KeyError:
        return  # an architecture the gguf package does not map: transformers' own missing-keys check stands
    used = {names.get_name(key, try_suffixes=(".weight", ".bias")) for key in model.state_dict()}
    extra = sorted(tensor.name for tensor in reader.tensors if tensor.name not in used and tensor.name not in IGNORED)
    if extra:
        raise CheckpointError(
            f"the GGUF file {path} holds {len(extra)} tensor(s) its {arch} architecture has no place for"
            f" ({_few(extra)}),"
            " which would be dropped. The file is not what its metadata says: convert the model again."
        )
