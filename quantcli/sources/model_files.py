"""A model folder's small files are read with bounds, and its layer count is checked against its weights,
before transformers parses or builds anything (issue 25, class 3).

* Every JSON and tokenizer file of a local folder must be a regular file (a symbolic link to one is
  fine: the Hugging Face cache is made of them) of bounded size: a ``config.json`` that is a FIFO would
  block the run forever, one linked to ``/dev/zero`` would fill memory.
* ``config.json``'s layer count must not exceed the decoder layers the safetensors headers hold (read
  from the headers alone, a few kilobytes): a config declaring 100,000 layers over a 5-layer checkpoint
  is refused before a 100,000-layer model is allocated.
"""

from __future__ import annotations

import json
import re
import stat
import struct
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError, ModelLoadError

MAX_CONFIG_BYTES = 64 << 20  # config.json, tokenizer_config.json, an index: kilobytes to a few megabytes
MAX_TOKENIZER_BYTES = 1 << 30  # tokenizer.json of a 256k vocabulary is about 30 MB
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_LAYER = re.compile(r"^(.*?\b(?:layers|h|blocks|block))\.(\d+)\.")


def _bound(path: Path) -> int:
    return MAX_TOKENIZER_BYTES if path.name in TOKENIZER_FILES else MAX_CONFIG_BYTES


def check_file(path: Path) -> None:
    """``path`` (following links) is a regular file within its size bound."""
    try:
        info = path.stat()
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error.strerror or error}. Fix or re-download the model.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(info.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(info.st_mode)
            else "a device or socket"
        )
        raise ModelLoadError(f"{path} is {kind}, not a regular file. Replace it with the model's real {path.name}.")
    if info.st_size > _bound(path):
        raise ModelLoadError(
            f"{path} is {info.st_size:,} bytes, more than the {_bound(path):,} quantcli reads."
            f" Replace it with the model's real {path.name}."
        )


def check_small_files(folder: Path) -> None:
    """Every ``*.json`` and tokenizer file of ``folder`` is a regular file within its size bound."""
    present = [folder / name for name in TOKENIZER_FILES if (folder / name).exists() or (folder / name).is_symlink()]
    for path in sorted({*folder.glob("*.json"), *present}):
        check_file(path)


def read_json(path: Path) -> Any:
    """A model folder's JSON file, checked by :func:`check_file` first; None if absent or not JSON."""
    if not path.exists() and not path.is_symlink():
        return None
    check_file(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def header_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            return []
        try:
            header = json.loads(handle.read(size))
        except (ValueError, RecursionError):
            return []  # transformers' own load names the corrupt file
    return [name for name in header if name != "__metadata__"] if isinstance(header, dict) else []


def check_layer_count(folder: Path) -> None:
    """config.json's layer count against the decoder layers its safetensors hold, before any model is built."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        return
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    key = next(
        (key for key in LAYER_KEYS if isinstance(config.get(key), int) and not isinstance(config.get(key), bool)), None
    )
    files = sorted(folder.glob("*.safetensors"))
    if key is None or not files:
        return
    found = [match for file in files for name in header_names(file) if (match := _LAYER.match(name))]
    if not found:
        return
    prefix, held, declared = found[0].group(1), max(int(match.group(2)) for match in found) + 1, config[key]
    if (
        declared > held
    ):  # fewer is left to the load's own check: some models keep extra layers (MTP) it drops on purpose
        fate = f"{prefix}.{held} onwards would be random"
        raise CheckpointError(
            f"{folder} does not match its config.json: it declares {declared:,} layers ({key}) but the weights hold"
            f" {held}"
            f" ({prefix}.0 to {prefix}.{held - 1}); {fate}. The checkpoint is incomplete or its config.json is wrong:"
            " re-download it or fix config.json."
        )


def check_model_folder(source: str | Path) -> None:
    """All checks on a local model folder that must come before transformers reads it (Hub ids pass)."""
    folder = Path(source)
    if folder.is_dir():
        check_small_files(folder)
        check_layer_count(folder)
