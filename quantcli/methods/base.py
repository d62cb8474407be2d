"""The quantizer interface every method implements, and the validation of its config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from quantcli.errors import InputError, option
from quantcli.methods import capable

if TYPE_CHECKING:
    from quantcli.quant.records import QuantizedModel, QuantizeRequest


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
    quantizes_tables: ClassVar[bool] = (
        False  # can quantize the input embedding and output head (QuantizeRequest.tables)
    )
    output_format: ClassVar[str]
    block_grids: ClassVar[bool] = False  # rounds onto a GGUF block type when the request carries one (--format gguf)
    streams: ClassVar[bool] = False  # its records are written block by block (--low-memory, --resume)
    allocates: ClassVar[bool] = False  # per-layer precision search (--target-*) can use its candidates
    default_for: ClassVar[tuple[tuple[int, str], ...]] = ()  # (bits, "cpu" | "cuda" | "any") it is the default for

    @classmethod
    def is_default(cls, bits: int, device: str) -> bool:
        """Whether ``--bits bits`` on ``device`` picks this method when none is named."""
        kind = "cuda" if device.startswith("cuda") else "cpu"
        return (bits, "any") in cls.default_for or (bits, kind) in cls.default_for

    run_options: ClassVar[
        tuple[str, ...]
    ] = ()  # run options it honours beyond bits (quantcli.config.honoured.RUN_OPTIONS)

    def make_config(self, bits: int, options: Mapping[str, Any], grid: Any = None) -> Any:
        """The method's config; with a GGUF ``grid`` the bits are the grid's, whatever the method's integer widths."""
        if grid is not None:
            if not self.block_grids:
                first, *others = capable("block_grids")
                names = " or ".join([option("method", first), *others])
                raise InputError(f"{option('format', 'gguf')} works with {names}, not {self.name}.")
        elif bits not in self.supported_bits:
            allowed = ", ".join(map(str, self.supported_bits))
            raise InputError(f"method {self.name} does not do {bits}-bit. It supports {option('bits')} {allowed}.")
        return build_config(self.name, self.config_class, bits, options)

    def unavailable_reason(self, device: str) -> str | None:
        """Why this method cannot run on ``device`` here, or None when it can."""
        return None

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        raise NotImplementedError
