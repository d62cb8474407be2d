"""The source checkpoint's safetensors files as streaming (:mod:`quantcli.run.streaming`) reads them:
which file holds each tensor, tensors read by name, the names grouped into one output shard per decoder
block, and the JSON files beside the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.errors import InputError, option


def source_tensors(source: str) -> dict[str, Path]:
    """Which safetensors file of ``source`` holds each tensor."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(
            f"{option('low_memory', True)} streams safetensors weights, and {source} has none. Convert the checkpoint "
            "to safetensors first."
        )
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            where.update({key: file for key in handle.keys()})
    return where


def read_tensors(names: list[str], where: dict[str, Path], disk: dict[str, str] | None = None) -> dict[str, Any]:
    """Tensors by the model's names; ``disk`` maps a name to the file's where they differ (Mixtral's experts)."""
    from safetensors import safe_open

    disk = disk or {}
    tensors = {}
    for file in sorted({where[name] for name in names}):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(disk.get(name, name)) for name in names if where[name] == file})
    return tensors


def shard_groups(names: list[str], prefix: str, blocks: int) -> list[list[str]]:
    """Tensor names per decoder block in block order, then per other module (embeddings, norm, head)."""
    inside: list[list[str]] = [[] for _ in range(blocks)]
    rest: dict[str, list[str]] = {}
    for name in sorted(names):
        index = name[len(prefix) + 1 :].split(".", 1)[0] if prefix and name.startswith(prefix + ".") else ""
        if index.isdigit() and int(index) < blocks:
            inside[int(index)].append(name)
        else:
            rest.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return inside + [rest[module] for module in sorted(rest)]


def config_files(source: str) -> list[Path]:
    """The JSON files beside the weights (config, tokenizer, index): they shape the model and its calibration."""
    return [path for path in Path(source).glob("*.json") if path.is_file()]
