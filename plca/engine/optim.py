"""SGD with the poly learning-rate schedule of DeepLab and the released PLCA code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    #: SGD as the paper; Adam (betas 0.9/0.999) trains a small model from scratch faster. The prototype of the
    #: embedded pair saw Adam collapse PLCA adaptation, so adaptation stays on SGD.
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    #: Steps over which the poly schedule decays to 0; None = the run's own length. The released code decays over
    #: a horizon longer than the run (GTAV: 30 scheduled epochs, 28 run), so the lr never reaches 0.
    poly_horizon: int | None = None
    #: lr multiplier of the classifier head relative to the backbone (the spec: 1.0, same lr for all).
    head_lr_mult: float = 1.0


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (or Adam) over the backbone (lr) and everything else (lr * head_lr_mult)."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else head).append(p)
    groups = [g for g in ({"params": backbone, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr_mult})
              if g["params"]]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_factor(step: int, horizon: int, power: float) -> float:
    """(1 - step / horizon) ** power, clamped at 0 past the horizon."""
    return max(0.0, 1.0 - step / horizon) ** power
