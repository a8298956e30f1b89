"""Registries of the plug-ins a config names: data sets, backbones, optimizers and
record sinks (train.loggers).

Each plug-in registers itself in the module that defines it (`DATASETS.register(...)`
beside its loader, as timm's `register_model` does), so adding one touches one code
file. This module sits at the bottom with config.py and imports nothing heavy: the
config validates `data.name`, `model.backbone`, `optim.name` and `train.loggers`
against these registries, and a registry imports its plug-ins' home only when an entry
is first looked up (`get`). That deferred import is the one edge from the lowest layer
up to the plug-ins. To check a name, the registry reads the names its home registers
from the home's source (`NAME.register("literal", ...)` calls, found with `ast`)
without importing it, so loading a config or `jrcl-fast --help` never imports torch
(tests/test_registry.py checks both, and that the names read equal those registered).

Every module of a home package registers on import (modules whose names start with
"_" are helpers and are skipped), so a new module there is found without a list to edit.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Iterator
from pathlib import Path
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

    def _home_files(self) -> list[Path]:
        """The source files of the home's modules, found without importing any package
        above them (importlib.util.find_spec would run their __init__)."""
        top, *parts = self.home.split(".")
        spec = importlib.util.find_spec(top)
        where = Path(spec.submodule_search_locations[0]).joinpath(*parts)
        if where.is_dir():
            return sorted(p for p in where.glob("*.py") if not p.name.startswith("_"))
        return [where.with_suffix(".py")]

    def declared(self) -> tuple[str, ...]:
        """The names the home's modules register with a literal string, read from their source."""
        names = []
        for path in self._home_files():
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "register" and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    names.append(node.args[0].value)
        return tuple(names)

    def names(self) -> tuple[str, ...]:
        """Every name a config may give: read from the home's source until an entry has
        been looked up, then the registered ones."""
        if self._discovered:
            return tuple(self._entries)
        return tuple(dict.fromkeys((*self.declared(), *self._entries)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> Entry:
        self._discover()
        if name not in self._entries:
            raise UserError(f"{self.key} {name!r} is not a known {self.kind}; use one of {', '.join(self.names())}")
        return self._entries[name]


DATASETS: Registry = Registry("data set", "data.name", "jrcl_fast.data.sets")
BACKBONES: Registry = Registry("backbone", "model.backbone", "jrcl_fast.models")
OPTIMIZERS: Registry = Registry("optimizer", "optim.name", "jrcl_fast.engine.optim")
LOGGERS: Registry = Registry("logger", "train.loggers", "jrcl_fast.engine.records")
