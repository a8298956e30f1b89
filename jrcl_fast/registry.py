"""Registries of the plug-ins a config names: data sets, backbones, optimizers and
divergences.

Each plug-in registers itself in the module that defines it (`DATASETS.register(...)`
beside its loader, as timm's `register_model` does), so adding one touches one code
file. This module sits at the bottom with config.py and imports nothing heavy: the
config validates `data.name`, `model.backbone`, `optim.name` and `loss.divergence`
against these registries, and a registry imports its plug-ins' home only when a name
is first looked up. That deferred import is the one edge from the lowest layer up to
the plug-ins; it keeps `import jrcl_fast.config` free of torch, and validating a
config imports just the homes of the keys it checks.

Every module of a home package registers on import (modules whose names start with
"_" are helpers and are skipped), so a new module there is found without a list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

from jrcl_fast.errors import UserError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Names to entries of one kind of plug-in, filled by the modules of `home`."""

    def __init__(self, kind: str, key: str, home: str):
        self.kind = kind  # what an entry is, for messages: "data set"
        self.key = key  # the config key that names an entry: "data.name"
        self.home = home  # module or package whose modules register the entries
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(self, name: str, entry: Entry) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def _discover(self) -> None:
        if self._discovered:
            return
        home = importlib.import_module(self.home)
        for module in pkgutil.iter_modules(getattr(home, "__path__", [])):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.home}.{module.name}")
        self._discovered = True

    def names(self) -> tuple[str, ...]:
        self._discover()
        return tuple(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> Entry:
        if name not in self:
            raise UserError(f"{self.key} {name!r} is not a known {self.kind}; use one of {', '.join(self.names())}")
        return self._entries[name]


DATASETS: Registry = Registry("data set", "data.name", "jrcl_fast.data.sets")
BACKBONES: Registry = Registry("backbone", "model.backbone", "jrcl_fast.models")
OPTIMIZERS: Registry = Registry("optimizer", "optim.name", "jrcl_fast.engine.optim")
DIVERGENCES: Registry = Registry("divergence", "loss.divergence", "jrcl_fast.losses.reference")
