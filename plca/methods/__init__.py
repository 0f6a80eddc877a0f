"""Training methods, each a small module plugged into the shared engine. A new method = one file + one entry here."""

from __future__ import annotations

from typing import Any

from torch import nn

from plca.config import from_dict
from plca.methods.base import Method, StepOutput, TrainContext
from plca.methods.minent import MinEnt, MinEntConfig
from plca.methods.plca import PLCA, PLCAConfig
from plca.methods.source_only import SourceOnly, SourceOnlyConfig

#: name -> (method class, its config dataclass)
METHODS: dict[str, tuple[type[Method], type]] = {
    "source_only": (SourceOnly, SourceOnlyConfig),
    "plca": (PLCA, PLCAConfig),
    "minent": (MinEnt, MinEntConfig),
}


def build_method(name: str, model: nn.Module, options: dict[str, Any], where: str = "method") -> Method:
    """Instantiate method `name` on `model`, its options validated against the method's config dataclass."""
    if name not in METHODS:
        raise ValueError(f"{where}: unknown method '{name}'; known: {sorted(METHODS)}")
    cls, cfg_cls = METHODS[name]
    return cls(model, from_dict(cfg_cls, options, where))


__all__ = ["METHODS", "Method", "StepOutput", "TrainContext", "build_method"]
