"""UDA methods. A method wraps a plain segmenter, turns a batch into named losses, and owns
any extra state and optimizers; the trainer runs them all.

Register a new method with `@register_method("name")` on a `UDAMethod` subclass whose
`Config` dataclass (a `MethodConfig`) lists its hyper-parameters and its components' sections;
the `method:` section of a config is built as that class when the config loads.
"""
from __future__ import annotations

from ..registry import METHODS
from .base import SegmentationMethodConfig, StepContext, UDAMethod


def register_method(name: str):
    def deco(cls):
        cls.method_name = name
        return METHODS.register(name)(cls)

    return deco


def method_names() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[UDAMethod]:
    return METHODS.get(name, "method.name")


def build_method(cfg, model) -> UDAMethod:
    """The method of a loaded config (`cfg.method` is its typed config) around `model`."""
    return get_method_class(cfg.method.name)(model, cfg)


# the built-in methods register themselves on import
from . import advent, cfcontra, confeti, cut, minent, self_training, source_only  # noqa: E402,F401

__all__ = ["UDAMethod", "SegmentationMethodConfig", "StepContext", "register_method", "build_method",
           "method_names", "get_method_class"]
