"""Optimisers (SGD, Adam, AdamW) with per-key lr and weight-decay multipliers, and the learning-rate schedules:
DeepLab's poly (the released PLCA code) and poly with a linear warmup (DAFormer)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    """One optimiser and its schedule (params `pretrain.optim`, `adapt.optim`, ...; a discriminator's in its
    method's options)."""

    #: SGD as the paper; Adam trains a small model from scratch faster; AdamW as DAFormer.
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 2.5e-4
    #: SGD only.
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: Adam and AdamW only (ADVENT's discriminator: 0.9, 0.99).
    betas: tuple[float, float] = (0.9, 0.999)
    poly_power: float = 0.9
    #: Steps over which the poly schedule decays to 0; None = the run's own length. The released code decays over
    #: a horizon longer than the run (GTAV: 30 scheduled epochs, 28 run), so the lr never reaches 0.
    poly_horizon: int | None = None
    #: Linear warmup from lr * warmup_ratio over these steps (DAFormer: 1500, 1e-6); 0 = none.
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    #: lr multiplier of every parameter outside the backbone (the head; the released PLCA code: 1.0, AdaptSegNet
    #: and ADVENT: 10).
    head_lr_mult: float = 1.0
    #: Per-key options: the first key (in order) contained in a parameter's name gives its `lr_mult` and
    #: `decay_mult` (DAFormer: {pos_block: {decay_mult: 0}, head: {lr_mult: 10}, norm: {decay_mult: 0}}); when
    #: set, it replaces head_lr_mult.
    custom_keys: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"optim.warmup_steps must be >= 0 and warmup_ratio in (0, 1], got {self.warmup_steps}"
                             f", {self.warmup_ratio}")
        if self.poly_horizon is not None and self.poly_horizon < 1:
            raise ValueError(f"optim.poly_horizon must be >= 1 or null, got {self.poly_horizon}")
        for key, opts in self.custom_keys.items():
            unknown = sorted(set(opts) - {"lr_mult", "decay_mult"})
            if unknown:
                raise ValueError(f"optim.custom_keys.{key}: unknown option(s) {unknown}; allowed: decay_mult, lr_mult")
        self.betas = tuple(self.betas)


def custom_key_options(name: str, custom_keys: Mapping[str, Mapping[str, float]], base_lr: float,
                       base_wd: float) -> tuple[float, float]:
    """(lr, weight decay) of parameter `name`: those of the first key of `custom_keys` contained in the name
    (mmcv's paramwise options, as DAFormer uses them), else the base values."""
    for key, opts in custom_keys.items():
        if key in name:
            return base_lr * opts.get("lr_mult", 1.0), base_wd * opts.get("decay_mult", 1.0)
    return base_lr, base_wd


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of `model`'s trainable parameters, grouped by (lr, weight decay) in order of appearance:
    without custom keys, the backbone at lr and everything else at lr * head_lr_mult."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.custom_keys:
            lr, wd = custom_key_options(name, cfg.custom_keys, cfg.lr, cfg.weight_decay)
        else:
            lr, wd = (cfg.lr if name.startswith("backbone.") else cfg.lr * cfg.head_lr_mult), cfg.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    # the backbone's group first (the logged lr), as the optimiser has always ordered them
    order = sorted(groups, key=lambda k: k != (cfg.lr, cfg.weight_decay))
    params = [{"params": groups[k], "lr": k[0], "weight_decay": k[1]} for k in order]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_factor(step: int, horizon: int, power: float) -> float:
    """(1 - step / horizon) ** power, clamped at 0 past the horizon."""
    return max(0.0, 1.0 - step / horizon) ** power


def poly_warmup_factor(step: int, max_iters: int, *, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
                       power: float = 1.0) -> float:
    """The poly factor times a linear warmup: 1 - (1 - t / warmup_iters)(1 - warmup_ratio) while t < warmup_iters
    (mmcv's linear warmup, as DAFormer trains), then 1."""
    factor = poly_factor(step, max_iters, power)
    if step < warmup_iters:
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def lr_factor(cfg: OptimConfig, step: int, steps: int) -> float:
    """The schedule's factor of the base lr at `step` of a `steps`-long run (at least 1: a 0-step run too)."""
    horizon = cfg.poly_horizon or max(steps, 1)
    if cfg.warmup_steps:
        return poly_warmup_factor(step, horizon, warmup_iters=cfg.warmup_steps, warmup_ratio=cfg.warmup_ratio,
                                  power=cfg.poly_power)
    return poly_factor(step, horizon, cfg.poly_power)
