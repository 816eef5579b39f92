"""UDA methods. A method wraps a plain segmenter, turns a batch into named
losses, and owns any extra state and optimizers; the trainer runs them all.

Register a new method with `@register_method("name")` on a `UDAMethod`
subclass whose `Config` dataclass lists its hyper-parameters.
"""
from __future__ import annotations

import difflib

from ..errors import ConfigError
from .base import MethodConfig, UDAMethod

_REGISTRY: dict[str, type[UDAMethod]] = {}


def register_method(name: str):
    def deco(cls):
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[UDAMethod]:
    _import_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"method.name: unknown method '{name}'{hint}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_config(data: dict, origins=None) -> MethodConfig:
    """Validate the `method:` section against the method's own Config dataclass."""
    from ..config import build_dataclass

    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError("method.name is required")
    cls = get_method_class(str(data["name"]))
    return build_dataclass(cls.Config, data, origins, "method.")


def build_method(cfg, model) -> UDAMethod:
    from ..config import build_dataclass

    cls = get_method_class(cfg.method["name"])
    mcfg = build_dataclass(cls.Config, cfg.method, None, "method.") if isinstance(cfg.method, dict) else cfg.method
    return cls(model, cfg, mcfg)


def _import_builtin() -> None:
    """Import every module of this package once, so each registers its methods.

    Lazy, so that `segadapt.config` can import this package cheaply.
    """
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["UDAMethod", "MethodConfig", "register_method", "build_method", "method_config", "method_names"]
