"""A named registry of classes that take one typed config: training methods (`plca.methods.registry`) and
pseudo-label policies (`plca.labelling`). Each module registers its class with the dataclass of its options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from plca.config import from_dict

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """name -> (class, its config dataclass); the class names itself in a `name` class attribute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, tuple[C, type]] = {}

    def register(self, config: type) -> Callable[[C], C]:
        """Class decorator: register a class under its `name`, with the dataclass of its options."""

        def add(cls: C) -> C:
            name = cls.name  # type: ignore[attr-defined]
            if name in self.entries and self.entries[name][0] is not cls:
                raise ValueError(f"{self.kind} name '{name}' is registered twice ({self.entries[name][0]} and {cls})")
            self.entries[name] = (cls, config)
            return cls

        return add

    def config(self, name: str, options: dict[str, Any], where: str) -> tuple[C, Any]:
        """(the class of `name`, its options validated against its config dataclass); errors name `where`."""
        if name not in self.entries:
            raise ValueError(f"{where}: unknown {self.kind} '{name}'; known: {sorted(self.entries)}")
        cls, cfg_cls = self.entries[name]
        return cls, from_dict(cfg_cls, options, where)
