"""The state file of an interrupted ``--low-memory`` run (``resume.json`` in its staging folder): data, checked
before anything in the staging folder is spliced into a checkpoint.

It never chooses code: a layer's record names one of :data:`RECORD_TYPES` by key (nothing is imported
from the file), its tensors are shapes and dtypes from a fixed list, and each record is compared with the
layer it claims to describe. It is read with a size bound from a regular file and written atomically
(a temporary file renamed over it), so a kill leaves the old state or the new one, and sealed with the
SHA-256 of its own content, so a damaged or hand-edited state is refused as a whole. ``--resume`` refuses,
in one line naming the difference and keeping the finished work, a state written for other settings,
other source files (size and modification time of each) or other library versions, and a finished shard
or saved activation file whose SHA-256 is not the one recorded when it was written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantcli import __version__
from quantcli.checkpoint.atomic import RESUME_FILE
from quantcli.errors import ResumeStateError, option
from quantcli.formats.bitsandbytes import NF4Weights
from quantcli.limits import MAX_METADATA_BYTES, read_bounded, shown
from quantcli.quant.intgrid import IntLayout, IntWeights
from quantcli.strict_json import dumps

ACTIVATIONS_FILE = "activations.safetensors"  # in the staging folder: the next block's calibration inputs
DTYPES = ("int8", "uint8", "int32", "float32", "float16", "bfloat16")
MAX_DIMS = 4
STATE_KEYS = {"settings": dict, "done": list, "written": dict, "hashes": dict, "activations_for": (int, type(None))}
FRESH_START = f"Run the same command without {option('resume', True)} to start over."


def record_types() -> dict[str, tuple[type, type | None]]:
    """The layer records a streamed method writes, by the key resume.json names them with (and their layout)."""

    return {"IntWeights": (IntWeights, IntLayout), "NF4Weights": (NF4Weights, None)}


def _refuse(staging: Path, why: str) -> ResumeStateError:
    return ResumeStateError(f"cannot resume from {staging}: {why}. The finished work is kept there. {FRESH_START}")


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(files: Iterable[Path]) -> dict[str, list[int]]:
    """Size and modification time (ns) of each file the run reads its model from."""
    prints = {}
    for path in sorted(set(files)):
        info = os.stat(path)
        prints[Path(path).name] = [info.st_size, info.st_mtime_ns]
    return prints


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    return {
        "quantcli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the SHA-256 of its canonical JSON (without the seal) under ``sha256``."""
    content = {key: value for key, value in state.items() if key != "sha256"}
    return {**content, "sha256": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()}


def write_state(staging: Path, state: dict[str, Any]) -> None:
    """Replace resume.json atomically: a kill leaves the previous state or this one, never half of it."""
    state = seal(state)
    path = staging / RESUME_FILE
    temporary = path.with_name(f".{RESUME_FILE}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(dumps(state, indent=2, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_state(staging: Path, settings: dict[str, Any], shards: list[str]) -> dict[str, Any]:
    """The verified state in ``staging`` ({} when there is none), or :class:`ResumeStateError`."""
    path = staging / RESUME_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        state = json.loads(read_bounded(path, "resume state", MAX_METADATA_BYTES).decode("utf-8"))
    except (ValueError, RecursionError) as error:
        why = f"{RESUME_FILE} is not valid JSON ({type(error).__name__}; a run killed while writing it?)"
        raise _refuse(staging, why) from None
    except Exception as error:
        raise _refuse(staging, f"{RESUME_FILE} cannot be read: {error}") from None
    if not isinstance(state, dict) or seal(state).get("sha256") != state.get("sha256"):
        raise _refuse(staging, f"{RESUME_FILE} does not match its own SHA-256 (damaged or edited)")
    _check_structure(staging, state, shards)
    _check_settings(staging, state["settings"], settings)
    for name in [*state["done"], *([ACTIVATIONS_FILE] if state["activations_for"] is not None else [])]:
        recorded = state["hashes"].get(name)
        if not (staging / name).is_file() or os.path.islink(staging / name):
            raise _refuse(staging, f"the finished file {name} is missing")
        if recorded != file_hash(staging / name):
            raise _refuse(staging, f"{name} is not the file this run wrote (its SHA-256 differs from the one recorded)")
    return state


def _check_structure(staging: Path, state: Any, shards: list[str]) -> None:
    if not isinstance(state, dict):
        raise _refuse(staging, f"{RESUME_FILE} is not a mapping")
    for key, kinds in STATE_KEYS.items():
        if key not in state or not isinstance(state[key], kinds) or isinstance(state[key], bool):
            raise _refuse(staging, f"{RESUME_FILE} has no valid '{key}' (got {shown(state.get(key))})")
    done = state["done"]
    if not all(isinstance(shard, str) for shard in done) or done != shards[: len(done)]:
        why = f"{RESUME_FILE} lists finished shards {shown(done)}, not the first of this model's {shown(shards[:2])}"
        raise _refuse(staging, why)
    if not all(isinstance(key, str) and isinstance(value, str) for key, value in state["hashes"].items()):
        raise _refuse(staging, f"{RESUME_FILE} has malformed file hashes")


def _check_settings(staging: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
    differ = sorted(key for key in {*recorded, *settings} if recorded.get(key) != settings.get(key))
    if differ:
        first = differ[0]
        then, now = shown(recorded.get(first)), shown(settings.get(first))
        raise _refuse(staging, f"it was written with other {', '.join(differ)} ({first}: {then} then, {now} now)")


def record_to_json(record: Any) -> dict[str, Any]:
    """A written layer's record as resume.json keeps it: its type's key, layout and tensor shapes."""
    kind = next(key for key, (cls, _) in record_types().items() if type(record) is cls)
    tensors = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    shapes = {
        name: [list(value.shape), str(value.dtype).removeprefix("torch.")]
        for name, value in tensors.items()
        if hasattr(value, "shape")
    }
    layout = getattr(record, "layout", None)
    return {"type": kind, "layout": dataclasses.asdict(layout) if layout is not None else None, "tensors": shapes}


def record_from_json(name: str, data: Any, weight_shape: tuple[int, ...], staging: Path) -> Any:
    """The record of layer ``name`` (weight ``weight_shape``) with meta tensors, checked field by field."""
    import torch

    bad = f"the record of {name} in {RESUME_FILE}"
    kinds = record_types()
    if not isinstance(data, dict) or set(data) != {"type", "layout", "tensors"} or data["type"] not in kinds:
        raise _refuse(staging, f"{bad} is not one of quantcli's layer records ({', '.join(kinds)})")
    cls, layout_cls = kinds[data["type"]]
    tensors = data["tensors"]
    fields = {f.name for f in dataclasses.fields(cls)} - {"layout"}
    if not isinstance(tensors, dict) or set(tensors) != fields:
        raise _refuse(staging, f"{bad} holds tensors {shown(tensors)}, not {', '.join(sorted(fields))}")
    built = {}
    for key, spec in tensors.items():
        if not _tensor_spec(spec):
            raise _refuse(staging, f"{bad} gives {key} as {shown(spec)}, not [shape, dtype]")
        built[key] = torch.empty(spec[0], dtype=getattr(torch, spec[1]), device="meta")
    codes = built.get("q", built.get("codes"))
    if codes is None or tuple(codes.shape) != tuple(weight_shape):
        shape = None if codes is None else list(codes.shape)
        raise _refuse(staging, f"{bad} stores a {shown(shape)} grid for a {list(weight_shape)} weight")
    if layout_cls is not None:
        built["layout"] = _layout(layout_cls, data["layout"], bad, staging)
    elif data["layout"] is not None:
        raise _refuse(staging, f"{bad} has a layout its type does not take")
    return cls(**built)


def _tensor_spec(spec: Any) -> bool:
    """``[[dims...], dtype]``: at most :data:`MAX_DIMS` non-negative integer dims, a dtype of :data:`DTYPES`."""
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], list) and spec[1] in DTYPES):
        return False
    dims = spec[0]
    return len(dims) <= MAX_DIMS and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in dims
    )


LAYOUT_TYPES = {
    "bits": (int,),
    "symmetric": (bool,),
    "group_size": (int, type(None)),
    "observer": (str,),
    "scale_dtype": (str, type(None)),
    "table": (bool,),
    "activations": (str, type(None)),
}


def _layout(cls: type, data: Any, bad: str, staging: Path) -> Any:
    if (
        not isinstance(data, dict)
        or set(data) != set(LAYOUT_TYPES)
        or not all(
            isinstance(data[key], kinds) and (bool in kinds or not isinstance(data[key], bool))
            for key, kinds in LAYOUT_TYPES.items()
        )
    ):
        raise _refuse(staging, f"{bad} has a malformed layout {shown(data)}")
    if (
        data["scale_dtype"] not in (None, *DTYPES)
        or data["bits"] not in (2, 3, 4, 8)
        or data["activations"] not in (None, "int8")
    ):
        raise _refuse(staging, f"{bad} has a layout outside quantcli's grids {shown(data)}")
    return cls(**data)
