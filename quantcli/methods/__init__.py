"""Method registry. Each module in this package registers its quantizers on import, so adding a
method is one new file here (plus its tests)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from quantcli.errors import InputError

if TYPE_CHECKING:
    from quantcli.methods.base import Quantizer

_REGISTRY: dict[str, type["Quantizer"]] = {}
_DEFAULTS = {(16, "any"): "cast", (8, "cuda"): "bnb-int8", (8, "cpu"): "rtn", (4, "cuda"): "bnb-nf4", (4, "cpu"): "rtn", (3, "any"): "gptq"}


def register_method(cls: type["Quantizer"]) -> type["Quantizer"]:
    _REGISTRY[cls.name] = cls
    return cls


_discovered = False


def _discover() -> None:
    """Import every method module once (a module imported directly registers only itself)."""
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True


def available_methods() -> list[type["Quantizer"]]:
    _discover()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_method(name: str) -> "Quantizer":
    _discover()
    if name not in _REGISTRY:
        raise InputError(f"unknown method '{name}'. Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]()


def default_method(bits: int, device: str) -> str:
    """The method ``--bits`` picks when ``--method`` is not given: bitsandbytes on CUDA, RTN on CPU."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return _DEFAULTS.get((bits, "any")) or _DEFAULTS[(bits, kind)]
