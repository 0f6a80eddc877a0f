"""The one registry of training methods: each method module registers itself with `@register`."""

from __future__ import annotations

from typing import Any

from torch import nn

from plca.engine.contract import Method
from plca.registry import Registry

_METHODS: Registry[type[Method]] = Registry("method")
#: name -> (method class, its config dataclass)
METHODS = _METHODS.entries
#: Class decorator: register a Method subclass under its `name`, with the dataclass of its options.
register = _METHODS.register


def method_config(name: str, options: dict[str, Any], where: str = "method") -> tuple[type[Method], Any]:
    """(the class of method `name`, its options validated against its config dataclass); errors name `where`."""
    return _METHODS.config(name, options, where)


def build_method(name: str, model: nn.Module, options: dict[str, Any], where: str = "method") -> Method:
    """Instantiate method `name` on `model`, its options validated against the method's config dataclass."""
    cls, cfg = method_config(name, options, where)
    return cls(model, cfg)
