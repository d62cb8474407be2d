"""The records a method hands to a format: the request it gets, the per-layer map and the quantized model.

They hold data only; writing them is the format's job (:func:`quantcli.formats.save`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
    blocks: Any = None  # a streaming block source (quantcli.run.streaming); None: the blocks of ``model`` in memory
    tables: tuple[str, ...] = ()  # the input embedding / untied output head, for methods with ``quantizes_tables``
    table_bits: int = 8  # 8: per row; 4: the layers' own grid
    grid: Any = None  # a GGUF block type (quantcli.formats.gguf.types.BlockType) to round onto, for --format gguf
    scale_dtype: str | None = (
        None  # what integer layers' scales are stored in (the kept dtype, quantcli.quant.keptdtype); None: the model's
    )

    def block_source(self, names: tuple[str, ...]) -> Any:
        """Where the driver (:func:`quantcli.quant.blockwise.quantize_blockwise`) gets each decoder block."""
        from quantcli.quant.blockwise import ModelBlocks

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
