"""One registry for quantcli's two kinds of plugin, methods and formats.

A plugin is a class with a ``name`` that registers itself when its module is imported
(``@METHODS.register``); the registry imports every module of its package, subpackages included, the first
time it is asked, so adding a plugin is adding a file. The capabilities of a plugin are attributes of its
class (e.g. ``Quantizer.streams``), never lists of names kept here or elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from quantcli.errors import QuantCliError

T = TypeVar("T")


class Registry(Generic[T]):
    """The plugins of one package, by name."""

    def __init__(self, package: str, unknown: str, error: type[QuantCliError]) -> None:
        self.package = package
        self.unknown = unknown  # the message for an unknown name: {name} and {available}
        self.error = error
        self._classes: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, cls: type[T]) -> type[T]:
        self._classes[cls.name] = cls  # type: ignore[attr-defined]
        return cls

    def _discover(self) -> None:
        if self._discovered:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{self.package}."):
            importlib.import_module(module.name)
        self._discovered = True

    def classes(self) -> list[type[T]]:
        self._discover()
        return [self._classes[name] for name in sorted(self._classes)]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._classes)

    def get(self, name: str) -> T:
        """A new instance of the plugin called ``name``; an unknown name is ``error`` listing the known ones."""
        self._discover()
        if name not in self._classes:
            raise self.error(self.unknown.format(name=name, available=", ".join(sorted(self._classes))))
        return self._classes[name]()
