"""The quantizer interface every method implements, and the records a method hands back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from quantcli.errors import InputError, option


@dataclass
class LayerRecord:
    """How one layer was stored; ``note`` says why it differs from the method's default, if it does."""

    bits: int
    scheme: str
    group_size: int | None = None
    shape: tuple[int, int] | None = None
    note: str | None = None


@dataclass
class QuantizeRequest:
    """What the pipeline hands a method: the loaded model and everything about the run."""

    source: str
    model: Any
    tokenizer: Any
    layers: tuple[str, ...]
    device: str
    dtype: Any
    config: Any
    calibration: Any = None
    trust_remote_code: bool = False
    progress: Callable[[int], None] = lambda advance: None
    device_map: str | None = None
    blocks: Any = None  # a streaming block source (quantcli.streaming); None: the blocks of ``model`` in memory
    tables: tuple[str, ...] = ()  # the input embedding / untied output head, for methods with ``quantizes_tables``
    table_bits: int = 8  # 8: per row; 4: the layers' own grid
    grid: Any = None  # a GGUF block type (quantcli.formats.gguf_grid.BlockType) to round onto, for --format gguf
    scale_dtype: str | None = None  # what integer layers' scales are stored in (the kept dtype, quantcli.keptdtype); None: the model's

    def block_source(self, names: tuple[str, ...]) -> Any:
        """Where the driver (:func:`quantcli.blockwise.quantize_blockwise`) gets each decoder block."""
        from quantcli.blockwise import ModelBlocks

        return self.blocks if self.blocks is not None else ModelBlocks(self.model, names)

    @property
    def placement(self) -> str:
        """What ``from_pretrained(device_map=...)`` gets: the accelerate map if one was asked for."""
        return self.device_map or self.device


@dataclass
class QuantizedModel:
    """A runnable quantized model, its per-layer map, and the neutral records (integer codes, scales,
    zero points and layout per layer; see :mod:`quantcli.formats`) that its ``format`` writes."""

    model: Any
    method: str
    bits: int
    format: str
    options: dict[str, Any]
    layers: dict[str, LayerRecord]
    records: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    kept_dtype: Any = None  # the torch dtype unquantized tensors are stored in (None: as the model holds them)

    def save(self, folder: Path, max_shard_size: int | None = None) -> None:
        """Write the checkpoint into ``folder`` in its format (shards of at most ``max_shard_size`` bytes if given)."""
        from quantcli.formats import get_format

        get_format(self.format).save(self, folder, max_shard_size)


def shard_kwargs(max_shard_size: int | None) -> dict[str, Any]:
    """``save_pretrained`` arguments: shards of at most ``max_shard_size`` bytes plus an index, if given."""
    return {} if max_shard_size is None else {"max_shard_size": max_shard_size}


_CASTS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,)}


def _accepts(annotation: str, value: Any) -> bool:
    """Check ``value`` against a simple annotation such as ``int | None``."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        kinds = _CASTS.get(part)
        if kinds and isinstance(value, kinds) and not (part in ("int", "float") and isinstance(value, bool)):
            return True
    return False


def build_config(method: str, config_class: type, bits: int, options: Mapping[str, Any]) -> Any:
    """Validate ``options`` against a method's config dataclass: unknown keys and wrong types are errors."""
    valid = {f.name: f for f in dataclasses.fields(config_class) if f.name != "bits"}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(sorted(valid)) or "none"
        raise InputError(f"option(s) {', '.join(unknown)} do not apply to method {method}. Its options: {listed}.")
    hints = {f.name: str(f.type) for f in valid.values()}
    for key, value in options.items():
        if not _accepts(hints[key], value):
            raise InputError(f"option {key} of method {method} must be {hints[key]}, got {value!r}.")
    return config_class(bits=bits, **dict(options))


class Quantizer:
    """One quantization method. Subclasses register themselves with ``@register_method``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    supported_bits: ClassVar[tuple[int, ...]]
    config_class: ClassVar[type]
    needs_calibration: ClassVar[bool] = False
    quantizes_tables: ClassVar[bool] = False  # can quantize the input embedding and output head (QuantizeRequest.tables)
    output_format: ClassVar[str]
    block_grids: ClassVar[bool] = False  # rounds onto a GGUF block type when the request carries one (--format gguf)
    run_options: ClassVar[tuple[str, ...]] = ()  # run options it honours beyond bits (quantcli.honoured.RUN_OPTIONS)

    def make_config(self, bits: int, options: Mapping[str, Any], grid: Any = None) -> Any:
        """The method's config; with a GGUF ``grid`` the bits are the grid's, whatever the method's integer widths."""
        if grid is not None:
            if not self.block_grids:
                raise InputError(f"{option('format', 'gguf')} works with {option('method', 'rtn')} or gptq, not {self.name}.")
        elif bits not in self.supported_bits:
            allowed = ", ".join(map(str, self.supported_bits))
            raise InputError(f"method {self.name} does not do {bits}-bit. It supports {option('bits')} {allowed}.")
        return build_config(self.name, self.config_class, bits, options)

    def unavailable_reason(self, device: str) -> str | None:
        """Why this method cannot run on ``device`` here, or None when it can."""
        return None

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        raise NotImplementedError
