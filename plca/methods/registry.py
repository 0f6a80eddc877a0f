"""The one registry of training methods: each method module registers itself with `@register`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from plca.config import from_dict
from plca.engine.contract import Method

M = TypeVar("M", bound=type[Method])

#: name -> (method class, its config dataclass)
METHODS: dict[str, tuple[type[Method], type]] = {}


def register(config: type) -> Callable[[M], M]:
    """Class decorator: register a Method subclass under its `name`, with the dataclass of its options."""

    def add(cls: M) -> M:
        if cls.name in METHODS and METHODS[cls.name][0] is not cls:
            raise ValueError(f"method name '{cls.name}' is registered twice ({METHODS[cls.name][0]} and {cls})")
        METHODS[cls.name] = (cls, config)
        return cls

    return add


def build_method(name: str, model: nn.Module, options: dict[str, Any], where: str = "method") -> Method:
    """Instantiate method `name` on `model`, its options validated against the method's config dataclass."""
    if name not in METHODS:
        raise ValueError(f"{where}: unknown method '{name}'; known: {sorted(METHODS)}")
    cls, cfg_cls = METHODS[name]
    return cls(model, from_dict(cfg_cls, options, where))
