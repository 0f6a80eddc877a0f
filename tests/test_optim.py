"""Optimisers and schedules the method specs need: SGD/Adam/AdamW with betas, per-key lr and decay multipliers
(DAFormer's), poly and poly with linear warmup, on hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plca.config import ConfigError, from_dict
from plca.engine.optim import (
    OptimConfig,
    custom_key_options,
    lr_factor,
    make_optimizer,
    poly_factor,
    poly_warmup_factor,
)
from plca.models.deeplabv2 import DeepLabV2Config, build_model

TINY = DeepLabV2Config(num_classes=19, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2))
DAFORMER_KEYS = {"pos_block": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}}


def test_poly_schedule_values() -> None:
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0
    assert poly_factor(150, 100, 0.9) == 0.0


def test_poly_warmup_factor_by_hand() -> None:
    # DAFormer: lr(t) = base (1 - t/40000) (t < 1500 ? 1 - (1 - t/1500)(1 - 1e-6) : 1)
    assert poly_warmup_factor(0, 40000) == pytest.approx(1e-6, rel=1e-9)
    assert poly_warmup_factor(750, 40000) == pytest.approx((1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6)), rel=1e-12)
    assert poly_warmup_factor(1500, 40000) == pytest.approx(1 - 1500 / 40000, rel=1e-12)
    assert poly_warmup_factor(20000, 40000, power=0.9) == pytest.approx(0.5**0.9, rel=1e-12)
    # the config's schedule: warmup off = plain poly over the run, or over its own horizon
    assert lr_factor(OptimConfig(), 5, 10) == poly_factor(5, 10, 0.9)
    assert lr_factor(OptimConfig(poly_horizon=20), 5, 10) == poly_factor(5, 20, 0.9)
    assert lr_factor(OptimConfig(warmup_steps=4, poly_power=1.0), 2, 10) == pytest.approx(0.8 * 0.5000005)
    assert lr_factor(OptimConfig(), 0, 0) == 1.0  # a 0-step run still has a schedule


def test_custom_key_options_first_contained_key_wins() -> None:
    assert custom_key_options("backbone.block1.0.attn.q.weight", DAFORMER_KEYS, 6e-5, 0.01) == (6e-5, 0.01)
    assert custom_key_options("decode_head.fuse.bn.weight", DAFORMER_KEYS, 6e-5, 0.01) == pytest.approx((6e-4, 0.01))
    assert custom_key_options("backbone.norm1.weight", DAFORMER_KEYS, 6e-5, 0.01) == (6e-5, 0.0)
    # "head" comes before "norm": a norm inside the head keeps its decay and takes the head's lr
    assert custom_key_options("head.norm.weight", DAFORMER_KEYS, 6e-5, 0.01) == pytest.approx((6e-4, 0.01))
    assert custom_key_options("x", {}, 1.0, 2.0) == (1.0, 2.0)


def test_optimizer_choice_betas_and_groups() -> None:
    model = build_model(TINY)
    n_params = len(list(model.parameters()))
    sgd = make_optimizer(model, OptimConfig(lr=0.1, head_lr_mult=10.0))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["lr"] for g in sgd.param_groups] == [0.1, 1.0]
    assert sum(len(g["params"]) for g in sgd.param_groups) == n_params
    adam = make_optimizer(model, OptimConfig(name="adam", lr=0.01, betas=(0.9, 0.99)))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.99)
    adamw = make_optimizer(model, OptimConfig(name="adamw", lr=6e-5, weight_decay=0.01,
                                              custom_keys={"classifier": {"lr_mult": 10.0}, "bn": {"decay_mult": 0}}))
    assert isinstance(adamw, torch.optim.AdamW)
    by_name = {id(p): n for n, p in model.named_parameters()}
    for g in adamw.param_groups:
        for p in g["params"]:
            assert (g["lr"], g["weight_decay"]) == custom_key_options(by_name[id(p)], adamw_keys(), 6e-5, 0.01)
    assert adamw.param_groups[0]["lr"] == 6e-5 and adamw.param_groups[0]["weight_decay"] == 0.01
    assert sum(len(g["params"]) for g in adamw.param_groups) == n_params


def adamw_keys() -> dict:
    return {"classifier": {"lr_mult": 10.0}, "bn": {"decay_mult": 0}}


def test_frozen_parameters_are_not_optimised() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].weight.requires_grad_(False)
    opt = make_optimizer(net, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 3


def test_bad_optimiser_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="optim.name: expected one of"):
        from_dict(OptimConfig, {"name": "rmsprop"}, "optim")
    with pytest.raises(ValueError, match="custom_keys.head: unknown option"):
        OptimConfig(custom_keys={"head": {"lr_multiplier": 10}})
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        OptimConfig(lr=0.0)
