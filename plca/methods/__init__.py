"""Training methods, each a small module that registers itself (`plca.methods.registry.register`).

A new method is one file in this folder and one name in the import lines below (which run its registration).
"""

from __future__ import annotations

from plca.engine.contract import EMASpec, Method, StepOutput, TrainContext
from plca.methods import adaptsegnet, advent, cbst, crst, dacs, daformer, intrada, minent, pgpc, plca, source_only, tpld  # noqa: F401
from plca.methods.registry import METHODS, build_method, register

__all__ = ["METHODS", "EMASpec", "Method", "StepOutput", "TrainContext", "build_method", "register"]
