"""Output formats. Each module in this package registers one format on import, so adding a format
is one new file here plus its tests (GGUF: ``gguf.py``, with its block grids in ``gguf_grid.py``).

A format turns a method's neutral per-layer records (integer codes, scales, zero points and their
layout: :class:`quantcli.intweights.IntWeights`, or bitsandbytes' NF4 codes) into stored tensors
(:meth:`Format.layer_tensors`, what streaming writes block by block) or writes a whole model
(:meth:`Format.save`), writes the checkpoint's quantization config after streaming
(:meth:`Format.finish`) and reads a checkpoint back (:meth:`Format.load`).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

from quantcli.errors import CheckpointError

_REGISTRY: dict[str, type["Format"]] = {}


class Format:
    """One checkpoint format; subclasses register themselves with ``@register_format``."""

    name: ClassVar[str]
    fixed_options: ClassVar[dict[str, str]] = {}  # options its own layout decides, with why (quantcli.honoured)

    def layer_tensors(self, name: str, record: Any, module: Any) -> dict[str, Any]:
        """The stored tensors of layer ``name`` (keys relative to it) from its method's ``record``."""
        raise NotImplementedError(f"the {self.name} format cannot be written layer by layer yet")

    def tied_tensors(self, model: Any, name: str, stored: dict[str, Any]) -> dict[str, Any]:
        """Tensors (full names) that a head tied to layer ``name`` needs beside ``name``'s ``stored`` ones."""
        return {}

    def save(self, quantized: Any, folder: Path, max_shard_size: int | None = None) -> None:
        """Write a whole quantized model (:class:`quantcli.methods.base.QuantizedModel`) into ``folder``;
        by default transformers' own serialisation of the model (dense, bitsandbytes)."""
        from quantcli.methods.base import shard_kwargs

        quantized.model.save_pretrained(folder, **shard_kwargs(max_shard_size))

    def finish(self, model: Any, records: dict[str, Any], folder: Path) -> None:
        """After every shard is written: the quantization section of ``folder/config.json``."""

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        """A runnable model from a checkpoint in this format."""
        from quantcli.models import load_model

        return load_model(folder, "auto", device, trust_remote_code)


def register_format(cls: type[Format]) -> type[Format]:
    _REGISTRY[cls.name] = cls
    return cls


_discovered = False


def _discover() -> None:
    """Import every format module once (a module imported directly registers only itself)."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


def format_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_format(name: str) -> Format:
    _discover()
    if name not in _REGISTRY:
        raise CheckpointError(f"unknown checkpoint format '{name}'. This quantcli reads: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]()
