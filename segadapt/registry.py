"""Registries: name -> class for the parts a config names (methods, backbones, decode heads,
datasets), filled by the modules that define them.

They live at the bottom of the package so that the config loader can validate a name
without importing the layers above it: each registry knows the package whose import
registers the built-in entries and imports it on first lookup, as a plugin system would.
Code outside the package registers its own entries the same way (config key `imports:`).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator, Optional

from .errors import ConfigError


class Registry:
    """Named entries of one kind. `register(name, **meta)` is a decorator; `get(name, key)`
    returns the entry or raises a one-line ConfigError naming `key` and the close names."""

    def __init__(self, kind: str, builtin: str):
        self.kind = kind
        self.builtin = builtin  # module whose import registers the built-in entries
        self._entries: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._loaded = False

    def register(self, name: str, **meta) -> Callable:
        def deco(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._meta[name] = meta
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.builtin)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return list(self)

    def registered(self) -> list[str]:
        """Names in the order they were registered (built-ins first, as their package lists them)."""
        self._load()
        return list(self._entries)

    def items(self):
        self._load()
        return sorted(self._entries.items())

    def meta(self, name: str) -> dict:
        self._load()
        return self._meta.get(name, {})

    def get(self, name: str, key: Optional[str] = None):
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} '{name}'{hint}; known: {', '.join(self)}")
        return self._entries[name]


def import_plugins(modules, key: str = "imports") -> None:
    """Import user modules (dotted names or .py files) that register methods, datasets or
    models; a module that cannot be imported is one ConfigError line naming it."""
    import importlib.util
    import sys
    from pathlib import Path

    for entry in modules:
        path = Path(entry)
        try:
            if entry.endswith(".py"):
                if not path.is_file():
                    raise ConfigError(f"{key}: {entry} does not exist")
                name = f"segadapt_plugin_{path.stem}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's module may raise anything
            raise ConfigError(f"{key}: cannot import {entry}: {type(e).__name__}: {e}".replace("\n", " ")) from None


METHODS = Registry("method", "segadapt.methods")
BACKBONES = Registry("backbone", "segadapt.models")
DECODE_HEADS = Registry("decode head", "segadapt.models")
DATASETS = Registry("dataset kind", "segadapt.data")
