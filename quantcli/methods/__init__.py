"""Quantization methods. Each module in this package registers its quantizers on import, so adding a
method is one new file here (plus its tests); what a method can do is an attribute of its class."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantcli.errors import InputError, option
from quantcli.registry import Registry

if TYPE_CHECKING:
    from quantcli.methods.base import Quantizer

METHODS: Registry[Quantizer] = Registry(__name__, "unknown method '{name}'. Available: {available}.", InputError)
register_method = METHODS.register
get_method = METHODS.get
available_methods = METHODS.classes


def capable(capability: str) -> list[str]:
    """The methods whose class sets ``capability`` (e.g. ``"streams"``), those without calibration first."""
    classes = [cls for cls in METHODS.classes() if getattr(cls, capability)]
    return [cls.name for cls in sorted(classes, key=lambda cls: (cls.needs_calibration, cls.name))]


def default_method(bits: int, device: str) -> str:
    """The method ``--bits`` picks on ``device`` when ``--method`` is not given (``Quantizer.default_for``)."""
    for cls in METHODS.classes():
        if cls.is_default(bits, device):
            return cls.name
    raise InputError(f"no method does {bits}-bit by default. Name one with {option('method')}.")


def describe_defaults() -> str:
    """The default method for each width, as ``--help`` states it."""
    widths = sorted({bits for cls in METHODS.classes() for bits, _ in cls.default_for}, reverse=True)
    parts = []
    for bits in widths:
        cpu, cuda = default_method(bits, "cpu"), default_method(bits, "cuda")
        parts.append(f"{bits}-bit {cpu}" if cpu == cuda else f"{bits}-bit {cuda} on CUDA, {cpu} on CPU")
    return "; ".join(parts)
