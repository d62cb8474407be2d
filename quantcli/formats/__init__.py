"""Output formats. Each module in this package (or subpackage, such as ``gguf/``) registers one format
on import, so adding a format is one new file here plus its tests.

A format turns a method's neutral per-layer records (integer codes, scales, zero points and their
layout: :class:`quantcli.quant.intgrid.IntWeights`, or bitsandbytes' NF4 codes) into stored tensors
(:meth:`Format.layer_tensors`, what streaming writes block by block) or writes a whole model
(:meth:`Format.save`), writes the checkpoint's quantization config after streaming
(:meth:`Format.finish`) and reads a checkpoint back (:meth:`Format.load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from quantcli.errors import CheckpointError
from quantcli.registry import Registry
from quantcli.sources.models import load_model


class Format:
    """One checkpoint format; subclasses register themselves with ``@register_format``."""

    name: ClassVar[str]
    fixed_options: ClassVar[dict[str, str]] = {}  # options its own layout decides, with why (quantcli.config.honoured)

    def layer_tensors(self, name: str, record: Any, module: Any) -> dict[str, Any]:
        """The stored tensors of layer ``name`` (keys relative to it) from its method's ``record``."""
        raise NotImplementedError(f"the {self.name} format cannot be written layer by layer yet")

    def tied_tensors(self, model: Any, name: str, stored: dict[str, Any]) -> dict[str, Any]:
        """Tensors (full names) that a head tied to layer ``name`` needs beside ``name``'s ``stored`` ones."""
        return {}

    def save(self, quantized: Any, folder: Path, max_shard_size: int | None = None) -> None:
        """Write a whole quantized model (:class:`quantcli.quant.records.QuantizedModel`) into ``folder``;
        by default transformers' own serialisation of the model (dense, bitsandbytes)."""
        quantized.model.save_pretrained(folder, **shard_kwargs(max_shard_size))

    def finish(self, model: Any, records: dict[str, Any], folder: Path) -> None:
        """After every shard is written: the quantization section of ``folder/config.json``."""

    def load(self, folder: str, device: str, trust_remote_code: bool = False) -> Any:
        """A runnable model from a checkpoint in this format."""
        return load_model(folder, "auto", device, trust_remote_code)


FORMATS: Registry[Format] = Registry(
    __name__, "unknown checkpoint format '{name}'. This quantcli reads: {available}.", CheckpointError
)
register_format = FORMATS.register
format_names = FORMATS.names
get_format = FORMATS.get


def save(quantized: Any, folder: Path, max_shard_size: int | None = None) -> None:
    """Write ``quantized`` into ``folder`` in its format (shards of at most ``max_shard_size`` bytes if given)."""
    get_format(quantized.format).save(quantized, folder, max_shard_size)


def shard_kwargs(max_shard_size: int | None) -> dict[str, Any]:
    """``save_pretrained`` arguments: shards of at most ``max_shard_size`` bytes plus an index, if given."""
    return {} if max_shard_size is None else {"max_shard_size": max_shard_size}
