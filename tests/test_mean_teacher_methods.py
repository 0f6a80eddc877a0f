"""The mean-teacher methods of spec mean-teacher.md (DACS, DAFormer, PGPC): the EMA rule and when it runs, the
released defaults, the networks and the one optimiser, the teacher's mode and gradient isolation, each step term
checked against a hand computation (CE over all pixels, FD on thing cells, the pixel contrast), the pseudo-label
weight (one scalar per batch) through ClassMix, the frozen FD encoder, and exact resume through the engine."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import test_engine
import torch
from test_engine import Kill, KillAfter, assert_killed_run_resumes, cfg, fit
from torch import nn
from torch.nn import functional as F

from plca.config import ConfigError
from plca.data import TransformConfig
from plca.data.datasets import Sample
from plca.data.rcs import RCSConfig
from plca.data.transforms import train_transform
from plca.engine.contract import EMASpec, TrainContext
from plca.engine.hooks import Hook
from plca.engine.optim import OptimConfig
from plca.engine.streams import KeyedDataset
from plca.losses import THING_CLASSES, contrast_inputs, pixel_contrast_loss
from plca.methods import METHODS, build_method
from plca.methods.dacs import DACS, DACSConfig
from plca.methods.daformer import DAFormer, DAFormerOptions
from plca.methods.pgpc import PGPC, PGPCOptions
from plca.models import (
    FEATURE_MAPS,
    LOGITS,
    DAFormerConfig,
    SegmentationModel,
    build_daformer,
    ema_alpha,
    ema_init_,
    ema_update_,
)
from plca.models.deeplabv2 import DeepLabV2Config, build_model
from plca.models.mit import DropPath

C = 19
CPU = torch.device("cpu")
TOY_DAFORMER = dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), head_embed_dims=64, head_channels=64,
                    dilations=(1, 2, 3, 4))
TINY_DEEPLAB = DeepLabV2Config(depth=18, width=0.25, norm="group", groups=8, aspp_rates=(1, 2))
SMALL_CONTRAST = {"contrast_size": [8, 8]}  # 65x65 of a 64-pixel crop would compare 8450^2 pairs
DAFORMER_OPTIM = OptimConfig(name="adamw", lr=1e-4, weight_decay=0.01,
                             custom_keys={"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}})


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def toy_daformer(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_daformer(DAFormerConfig(**{**TOY_DAFORMER, **kw})).train()


def tiny_deeplab(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY_DEEPLAB).train()


def ready(name: str, model: nn.Module, options: dict | None = None):
    """Method `name` on `model`, told the normalisation and started at step 0 as the engine does."""
    method = build_method(name, model, {**({"rcs": None} if name != "dacs" else {}), **(options or {})})
    method.set_normalization(TransformConfig())
    method.before_step(TrainContext(CPU, 0, 10))
    return method


def labels64() -> torch.Tensor:
    """Two 64x64 source labels on the stage-4 grid of 32x32 cells. Image 0: car (13) at cell (0, 0), road elsewhere,
    cell (1, 1) 26/32 rows of motorcycle (17), 0.8125 >= 0.75: kept. Image 1: vegetation (8), cell (0, 0) half car
    (0.5 < 0.75: not kept), person (11) at cell (1, 1), a few ignored pixels. FD keeps 3 cells."""
    ys = torch.zeros(2, 64, 64, dtype=torch.long)
    ys[0, :32, :32] = 13
    ys[0, 38:, 32:] = 17
    ys[1] = 8
    ys[1, :32, :16] = 13
    ys[1, 32:, 32:] = 11
    ys[1, 40:48, :8] = 255
    return ys


def batch64(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"source_image": torch.randn(2, 3, 64, 64, generator=g), "source_label": labels64(),
            "target_image": 1.0 + 1.5 * torch.randn(2, 3, 64, 64, generator=g)}


class FixedTeacher(SegmentationModel):
    """A teacher whose logits (stride 4) are fixed: per image i, class `classes[i]` leads the others by
    `margins[i]`."""

    def __init__(self, classes: tuple[int, ...], margins: tuple[float, ...], size: tuple[int, int] = (16, 16)):
        super().__init__()
        logits = torch.zeros(len(classes), C, *size)
        for i, (c, m) in enumerate(zip(classes, margins, strict=True)):
            logits[i, c] = m
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {LOGITS: self.logits[: len(x)].clone()}


def params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_equal_params(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what}: parameter {i}"


# ---- 1. the EMA rule -------------------------------------------------------------------------------------------


def test_ema_alpha_rises_from_zero_to_its_cap() -> None:
    assert ema_alpha(0) == 0.0 and ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1) == 0.5 and ema_alpha(1, 0.99) == 0.5
    assert ema_alpha(3) == pytest.approx(0.75)
    assert ema_alpha(10**6, 0.999) == 0.999
    assert ema_alpha(10**6, 0.99) == 0.99
    assert ema_alpha(10**6) == 0.999  # DAFormer's alpha is the default
    assert ema_alpha(99, 0.99) == pytest.approx(0.99) and ema_alpha(50, 0.99) == pytest.approx(1 - 1 / 51)


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    nn.init.normal_(net[1].weight)
    nn.init.normal_(net[1].bias)
    return net


def test_ema_update_moves_parameters_only() -> None:
    student, teacher = bn_net(0), bn_net(1)
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    assert ema_update_(teacher, student, 0) == 0.0  # step 0: the teacher becomes the student
    assert_equal_params(params(teacher), params(student), "step 0")
    for k, v in teacher.named_buffers():  # BatchNorm statistics are not averaged, not even copied
        assert torch.equal(v, buffers[k]), k
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)

    student2, teacher2 = bn_net(2), bn_net(3)
    t0, s0 = params(teacher2), params(student2)
    assert ema_update_(teacher2, student2, 1, 0.999) == 0.5  # step 1: the midpoint
    for t, a, b in zip(teacher2.parameters(), t0, s0, strict=True):
        torch.testing.assert_close(t.detach(), (a + b) / 2, rtol=0, atol=1e-7)
    assert_equal_params(params(student2), s0, "the student is not moved")
    t1 = params(teacher2)
    assert ema_update_(teacher2, student2, 10**6, 0.99) == 0.99
    for t, a, b in zip(teacher2.parameters(), t1, s0, strict=True):
        torch.testing.assert_close(t.detach(), 0.99 * a + 0.01 * b)

    student3, teacher3 = bn_net(4), bn_net(5)
    buffers3 = {k: v.clone() for k, v in teacher3.named_buffers()}
    ema_init_(teacher3, student3)
    assert_equal_params(params(teacher3), params(student3), "ema_init_")
    assert all(torch.equal(v, buffers3[k]) for k, v in teacher3.named_buffers())


# ---- 2. the released defaults and option validation ------------------------------------------------------------


def test_defaults_are_the_released_values() -> None:
    d = DACSConfig()
    assert (d.alpha, d.ema_before_step, d.threshold, d.ignore_top, d.ignore_bottom) == (0.99, False, 0.968, 0, 0)
    assert (d.pseudo_weight, d.batch_union, d.jitter, d.jitter_p, d.blur_p, d.ignore_index) == (1.0, False, 0.25, 0.8,
                                                                                                 0.5, 255)
    f = DAFormerOptions()
    assert (f.alpha, f.ema_before_step, f.threshold, f.ignore_top, f.ignore_bottom) == (0.999, True, 0.968, 15, 120)
    assert (f.pseudo_weight, f.batch_union, f.jitter, f.jitter_p, f.blur_p) == (1.0, True, 0.2, 0.8, 0.5)
    assert f.rcs == RCSConfig(temperature=0.01, min_pixels=3000, min_crop_pixels=1500, max_tries=10)
    assert (f.w_fd, f.fd_min_ratio) == (0.005, 0.75)
    assert f.fd_classes == THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    assert DAFormerOptions().rcs is not f.rcs  # a fresh default each
    p = PGPCOptions()
    assert (p.pseudo_weight, p.w_contrast_src, p.w_contrast_mix, p.contrast_size, p.pair_order) == (
        0.8, 1.0, 1.0, (65, 65), "released")
    # the rest is DAFormer's
    assert (p.alpha, p.ema_before_step, p.ignore_top, p.ignore_bottom, p.batch_union, p.jitter, p.w_fd) == (
        0.999, True, 15, 120, True, 0.2, 0.005)
    assert p.rcs == RCSConfig() and p.fd_classes == THING_CLASSES
    assert METHODS["dacs"] == (DACS, DACSConfig)
    assert METHODS["daformer"] == (DAFormer, DAFormerOptions)
    assert METHODS["pgpc"] == (PGPC, PGPCOptions)
    assert DACS.rare_class_sampling(d) is None
    assert DAFormer.rare_class_sampling(f) == RCSConfig() and PGPC.rare_class_sampling(p) == RCSConfig()
    assert DAFormer.rare_class_sampling(DAFormerOptions(rcs=None)) is None
    assert DACS.streams == ("source", "target")


def test_options_from_params_are_validated_and_unknown_ones_named() -> None:
    model = tiny_deeplab()
    for name, bad in (("dacs", "alpah"), ("dacs", "w_fd"), ("daformer", "w_contrast_src"), ("pgpc", "w_fdd")):
        with pytest.raises(ConfigError, match=bad):
            build_method(name, model, {bad: 0.1})
    with pytest.raises(ConfigError, match="pair_order"):
        build_method("pgpc", model, {"pair_order": "sorted", "w_fd": 0.0})
    m = build_method("pgpc", model, {"rcs": {"temperature": 0.05}, "contrast_size": [8, 16], "w_fd": 0.0,
                                     "pair_order": "aligned"})
    assert m.cfg.rcs == RCSConfig(temperature=0.05) and m.cfg.contrast_size == (8, 16)
    assert m.cfg.pair_order == "aligned"
    assert build_method("daformer", model, {"rcs": None, "w_fd": 0.0}).cfg.rcs is None
    for bad in ({"alpha": 1.0}, {"threshold": 0.0}, {"ignore_top": -1}, {"jitter_p": 1.5}):
        with pytest.raises(ValueError):
            build_method("dacs", model, bad)
    with pytest.raises(ValueError, match="contrast_size"):
        build_method("pgpc", model, {"contrast_size": [0, 8], "w_fd": 0.0})


# ---- 3. networks, teachers, optimisers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dacs", "daformer", "pgpc"])
def test_networks_teacher_and_the_one_optimiser(name: str) -> None:
    model = toy_daformer()
    method = ready(name, model)
    nets = method.networks()
    assert list(nets) == ["model", "teacher"]
    assert nets["model"] is model and nets["teacher"] is method.teacher and method.teacher is not model
    alpha, before = (0.99, False) if name == "dacs" else (0.999, True)
    assert method.teachers() == {"teacher": EMASpec("model", alpha, before)}
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert_equal_params(params(method.teacher), params(model), "the teacher starts as the student")
    base = OptimConfig(name="adamw", lr=6e-5)
    assert method.optimizers(base) == {"model": base}
    other = build_method(name, toy_daformer(), {"alpha": 0.5, "ema_before_step": not before,
                                                **({} if name == "dacs" else {"rcs": None})})
    assert other.teachers() == {"teacher": EMASpec("model", 0.5, not before)}


# ---- 4. the teacher's mode and gradients -----------------------------------------------------------------------


def test_teacher_predicts_in_train_mode_without_dropout_and_takes_no_gradient() -> None:
    model = toy_daformer(dropout_ratio=0.1, drop_path_rate=0.1)
    method = ready("daformer", model)
    teacher = method.teacher
    stochastic = [m for m in teacher.modules() if isinstance(m, nn.modules.dropout._DropoutNd | DropPath)]
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert stochastic and norms
    seen: dict[str, list[bool]] = {"stochastic": [], "norm": []}
    handles = [m.register_forward_pre_hook(lambda mod, _a, k=k: seen[k].append(mod.training))
               for k, mods in (("stochastic", stochastic), ("norm", norms)) for m in mods]
    captured: list[torch.Tensor] = []
    handles.append(teacher.register_forward_hook(lambda _m, _i, out: captured.append(out[LOGITS].detach())))
    b = batch64()
    stats_before = norms[0].running_mean.clone()
    out = method.training_step(b)
    for h in handles:
        h.remove()
    # during the teacher's forward: DropPath/Dropout off, BatchNorm on the batch's statistics
    assert seen["stochastic"] and not any(seen["stochastic"])
    assert seen["norm"] and all(seen["norm"])
    assert not torch.equal(norms[0].running_mean, stats_before)  # train-mode BN updated its statistics
    # and after the step
    assert teacher.training and all(not m.training for m in stochastic) and all(m.training for m in norms)
    assert all(m.training for m in model.modules())  # the student is untouched: dropout and drop-path on
    # the teacher's prediction is deterministic (no dropout) and uses the batch's statistics (not running ones)
    assert len(captured) == 1
    torch.manual_seed(1234)
    with torch.no_grad():
        again = teacher(b["target_image"])[LOGITS]
        frozen_stats = copy.deepcopy(teacher).eval()(b["target_image"])[LOGITS]
    torch.testing.assert_close(again, captured[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(frozen_stats, captured[0], atol=1e-3)

    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in method.imnet.parameters())
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert sum(bool(p.grad.abs().sum() > 0) for p in model.parameters()) > 0.9 * len(list(model.parameters()))


# ---- 5. the step's terms, by hand ------------------------------------------------------------------------------


def up(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def all_pixel_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE per pixel (255 gives 0), times the weight, summed and divided by *every* pixel (spec step 2)."""
    ce = F.cross_entropy(up(logits, labels.shape[-2:]), labels, ignore_index=255, reduction="none")
    if weight is not None:
        ce = ce * weight
    return ce.sum() / labels.numel()


def replay_mix(method, b: dict[str, torch.Tensor], seed: int):
    """The step's pseudo-labels and ClassMix as `training_step` drew them after `torch.manual_seed(seed)` and
    `before_step` (the method's generator: ClassMix first, then the augmentation)."""
    torch.manual_seed(seed)
    method.before_step(TrainContext(CPU, 0, 10))
    xs, ys, xt = b["source_image"], b["source_label"], b["target_image"]
    yt, wt = method._pseudo_labels(xt, tuple(ys.shape[-2:]))
    return (yt, wt, *method._mix(xs, ys, xt, yt, wt))


def test_dacs_objective_is_ce_over_all_pixels_plus_the_weighted_mix_ce() -> None:
    model = tiny_deeplab()
    # no strong augmentation, so the mixed images can be replayed; half the batch confident: weight 0.5
    method = ready("dacs", model, {"jitter_p": 0.0, "blur_p": 0.0})
    method.teacher = FixedTeacher((3, 5), (100.0, 1.0))
    b = batch64()
    torch.manual_seed(7)
    method.before_step(TrainContext(CPU, 0, 10))
    out = method.training_step(b)
    assert set(out.terms) == {"ce", "ce_mix", "pseudo_weight"}
    xs, ys = b["source_image"], b["source_label"]
    yt, wt, images, labels, weights = replay_mix(method, b, 7)
    assert torch.equal(wt, torch.full_like(wt, 0.5))  # q = 1/2 over the batch, not 1 and 0 per image
    assert out.terms["pseudo_weight"] == 0.5
    with torch.no_grad():
        ce = all_pixel_ce(model(xs)[LOGITS], ys)
        ce_valid = F.cross_entropy(up(model(xs)[LOGITS], ys.shape[-2:]), ys, ignore_index=255)
        ce_mix = all_pixel_ce(model(images)[LOGITS], labels, weights)
    assert out.terms["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert abs(ce.item() - ce_valid.item()) > 1e-3  # the ignored pixels count in the divisor
    assert out.terms["ce_mix"] == pytest.approx(ce_mix.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(ce.item() + ce_mix.item(), rel=1e-4)
    pasted = weights == 1
    assert pasted.any() and (~pasted).any()
    assert torch.equal(weights[~pasted], torch.full_like(weights[~pasted], 0.5))


def test_daformer_adds_fd_on_thing_cells_against_the_frozen_encoder() -> None:
    model = toy_daformer(drop_path_rate=0.0)  # a deterministic encoder, to recompute its features
    method = ready("daformer", model)
    with torch.no_grad():  # move the student away from the frozen copy
        for p in model.backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = batch64()
    out = method.training_step(b)
    assert set(out.terms) == {"ce", "fd", "ce_mix", "pseudo_weight"}
    xs = b["source_image"]
    with torch.no_grad():
        fs, fi = model.backbone(xs)[-1], method.imnet(xs)[-1]
    assert fs.shape[-2:] == (2, 2)  # stride 32
    dist = torch.linalg.vector_norm(fs - fi, dim=1)  # [B, 2, 2]
    kept = torch.stack([dist[0, 0, 0], dist[0, 1, 1], dist[1, 1, 1]])  # car, 0.81 motorcycle, person
    assert out.terms["fd"] == pytest.approx(kept.mean().item(), rel=1e-5)
    assert abs(kept.mean().item() - dist.mean().item()) > 1e-4  # not every cell
    assert out.loss.item() == pytest.approx(out.terms["ce"] + 0.005 * out.terms["fd"] + out.terms["ce_mix"],
                                            rel=1e-5)
    # the student at its start (no drop-path) has FD 0: the frozen copy is its own encoder
    fresh = ready("daformer", toy_daformer(drop_path_rate=0.0))
    assert fresh.training_step(b).terms["fd"] == pytest.approx(0.0, abs=1e-5)
    # w_fd 0: no term and no frozen copy
    off = ready("daformer", toy_daformer(), {"w_fd": 0.0})
    assert off.imnet is None
    assert set(off.training_step(b).terms) == {"ce", "ce_mix", "pseudo_weight"}


def test_dacs_on_deeplab_logs_its_terms_and_daformer_fd_needs_feature_maps() -> None:
    b = batch64()
    out = ready("dacs", tiny_deeplab()).training_step(b)
    assert set(out.terms) == {"ce", "ce_mix", "pseudo_weight"} and math.isfinite(out.loss.item())
    # DeepLab has a `backbone`: the frozen copy is made, but its output has no stage maps: the step names them
    deeplab_fd = ready("daformer", tiny_deeplab())
    assert deeplab_fd.imnet is not None
    with pytest.raises(ValueError, match="feature_maps"):
        deeplab_fd.training_step(b)
    assert set(ready("daformer", tiny_deeplab(), {"w_fd": 0.0}).training_step(b).terms) == {"ce", "ce_mix",
                                                                                           "pseudo_weight"}

    class NoEncoder(SegmentationModel):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, C, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {LOGITS: self.conv(x)}

    with pytest.raises(ValueError, match="w_fd"):
        build_method("daformer", NoEncoder(), {"rcs": None})


def test_pgpc_adds_the_source_and_mixed_pixel_contrast() -> None:
    model = toy_daformer(drop_path_rate=0.0)
    method = ready("pgpc", model, SMALL_CONTRAST)
    b = batch64()
    out = method.training_step(b)
    assert set(out.terms) == {"ce", "fd", "cl_src", "ce_mix", "cl_mix", "pseudo_weight"}
    t = out.terms
    assert out.loss.item() == pytest.approx(t["ce"] + 0.005 * t["fd"] + t["cl_src"] + t["ce_mix"] + t["cl_mix"],
                                            rel=1e-5)
    with torch.no_grad():
        maps = model(b["source_image"])[FEATURE_MAPS]
    feats, lab, w = contrast_inputs(maps, b["source_label"].unsqueeze(1), None, size=(8, 8))
    assert w is None
    released = pixel_contrast_loss(feats, lab, None, pair_order="released")
    aligned = pixel_contrast_loss(feats, lab, None, pair_order="aligned")
    assert t["cl_src"] == pytest.approx(released.item(), rel=1e-4)
    assert abs(released.item() - aligned.item()) > 1e-4  # B = 2: the two pairings differ
    no_src = ready("pgpc", toy_daformer(), {**SMALL_CONTRAST, "w_contrast_src": 0.0, "w_fd": 0.0})
    assert set(no_src.training_step(b).terms) == {"ce", "ce_mix", "cl_mix", "pseudo_weight"}


# ---- 6. the frozen FD encoder ----------------------------------------------------------------------------------


def test_frozen_fd_encoder_is_the_starting_encoder_and_never_moves() -> None:
    model = toy_daformer()
    method = ready("daformer", model)
    imnet = method.imnet
    assert imnet is not None and imnet is not model.backbone
    assert imnet not in method.networks().values()
    start = {k: v.clone() for k, v in imnet.state_dict().items()}
    assert start.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in start.items())
    assert not imnet.training and not any(m.training for m in imnet.modules())
    assert all(not p.requires_grad for p in imnet.parameters())
    student_start = params(model.backbone)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for seed in range(2):
        opt.zero_grad()
        method.before_step(TrainContext(CPU, seed, 10))
        method.training_step(batch64(seed)).loss.backward()
        opt.step()
    assert all(torch.equal(v, start[k]) for k, v in imnet.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(student_start, params(model.backbone), strict=True))
    assert not imnet.training


# ---- 7. the pseudo-label weight through ClassMix ---------------------------------------------------------------


def pasted_mask(images: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool: where the mixed image is the source's (random images: never both)."""
    src, tgt = (images == xs).all(1), (images == xt).all(1)
    assert torch.equal(src, ~tgt)
    return src


def test_confident_teacher_gives_weight_one_and_its_argmax_on_target_pixels() -> None:
    b = batch64()
    xs, ys, xt = b["source_image"], b["source_label"], b["target_image"]
    teacher = FixedTeacher((3, 5), (100.0, 100.0))
    border = {"ignore_top": 2, "ignore_bottom": 3, "w_fd": 0.0}
    for name, options, scale, top, bottom in (("dacs", {}, 1.0, 0, 0),
                                              ("daformer", border, 1.0, 2, 3),
                                              ("pgpc", border, 0.8, 2, 3),
                                              ("daformer", {"w_fd": 0.0}, 1.0, 15, 49)):  # 15 + 120 rows: all 64
        method = ready(name, tiny_deeplab(), options)
        method.teacher = teacher
        yt, wt = method._pseudo_labels(xt, (64, 64))
        assert yt.dtype == torch.int64 and wt.dtype == torch.float32 and wt.shape == (2, 64, 64)
        assert torch.equal(yt[0], torch.full_like(yt[0], 3)) and torch.equal(yt[1], torch.full_like(yt[1], 5))
        want = torch.full((2, 64, 64), scale)
        want[:, :top] = 0
        want[:, 64 - bottom:] = 0
        assert torch.equal(wt, want), name
        images, labels, weights = method._mix(xs, ys, xt, yt, wt)
        m = pasted_mask(images, xs, xt)
        assert torch.equal(weights, torch.where(m, torch.ones_like(wt), wt))
        assert torch.equal(labels, torch.where(m, ys, yt))
        if name == "dacs":
            assert torch.equal(weights, torch.ones_like(weights))  # weight 1 on every pixel
            assert method.training_step(b).terms["pseudo_weight"] == 1.0


def test_unconfident_teacher_weights_only_the_pasted_pixels() -> None:
    b = batch64()
    xs, ys, xt = b["source_image"], b["source_label"], b["target_image"]
    method = ready("dacs", tiny_deeplab(), {"threshold": 1.0})
    method.teacher = FixedTeacher((3, 5), (5.0, 5.0))
    yt, wt = method._pseudo_labels(xt, (64, 64))
    assert torch.equal(wt, torch.zeros_like(wt))
    images, labels, weights = method._mix(xs, ys, xt, yt, wt)
    m = pasted_mask(images, xs, xt)
    assert torch.equal(weights, m.float())  # 0 on target pixels, 1 on pasted source pixels
    assert torch.equal(images, torch.where(m.unsqueeze(1), xs, xt))
    # every unpasted pixel carries the teacher's argmax (no per-pixel filter); a pasted 255 stays ignored
    assert torch.equal(labels, torch.where(m, ys, yt))
    assert method.training_step(b).terms["pseudo_weight"] == 0.0


def pasted_counts(method, b: dict[str, torch.Tensor], draws: int) -> list[tuple[int, int]]:
    """Per draw, per image, how many of the image's own classes (255 included) ClassMix pasted; each pasted class
    pasted whole."""
    xs, ys, xt = b["source_image"], b["source_label"], b["target_image"]
    yt, wt = torch.zeros_like(ys), torch.zeros(ys.shape)
    counts = []
    for d in range(draws):
        torch.manual_seed(d)
        method.before_step(TrainContext(CPU, d, draws))
        images, _, _ = method._mix(xs, ys, xt, yt, wt)
        m = pasted_mask(images, xs, xt)
        per_image = []
        for i in range(len(ys)):
            n = 0
            for c in ys[i].unique():
                inside = m[i][ys[i] == c]
                assert inside.all() or not inside.any()  # a class is pasted whole or not at all
                n += int(inside.all())
            per_image.append(n)
        counts.append(tuple(per_image))
    return counts


def test_classmix_candidates_per_image_for_dacs_and_of_the_batch_for_daformer() -> None:
    b = batch64()
    # image 0: {0, 13, 17}, 2 of 3 pasted; image 1: {8, 11, 13, 255}, 2 of 4
    dacs = pasted_counts(ready("dacs", tiny_deeplab()), b, 20)
    assert set(dacs) == {(2, 2)}
    # DAFormer: 3 of the union's 6, drawn per image: the image's own share varies
    daformer = pasted_counts(ready("daformer", tiny_deeplab(), {"w_fd": 0.0}), b, 20)
    assert len(set(daformer)) > 1
    assert all(0 <= n0 <= 3 and 0 <= n1 <= 3 for n0, n1 in daformer)


# ---- 8. exact resume through the engine -------------------------------------------------------------------------


class MemoryReader64:
    """64x64 random images; labels on a 2x2 grid of 32x32 blocks mixing stuff and thing classes."""

    def __init__(self, n: int, seed: int, labels: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        blocks = rng.choice(np.array([0, 1, 2, 8, 10, 11, 13, 18], np.uint8), (n, 2, 2))
        self.labels = np.kron(blocks, np.ones((32, 32), np.uint8)) if labels else None
        self.names = [f"img{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> Sample:
        return Sample(image=self.images[i], label=None if self.labels is None else self.labels[i], name=self.names[i])


TCFG64 = TransformConfig(crop=(64, 64), flip=True)


def streams64(seed: int = 0) -> dict[str, KeyedDataset]:
    tf = lambda s, rng: train_transform(s, TCFG64, rng)  # noqa: E731
    return {"source": KeyedDataset(MemoryReader64(5, 1), tf, seed, 0),
            "target": KeyedDataset(MemoryReader64(4, 2, labels=False), tf, seed, 1)}


@pytest.fixture
def crops64(monkeypatch):
    """test_engine's `fit` on 64x64 crops (FD needs a crop divisible by 32)."""
    monkeypatch.setattr(test_engine, "streams", streams64)


def test_a_resumed_step_draws_what_the_uninterrupted_step_drew(tmp_path: Path) -> None:
    """The mean teachers draw from torch's global RNG inside each step (the seed of ClassMix and the augmentation in
    `before_step`, DropPath, Dropout): a resumed step must see the RNG state the uninterrupted run's step saw."""

    def make_spy(draws: list[float]):
        _, method = test_engine.make("source_only")
        step = method.training_step

        def spy(batch: dict[str, torch.Tensor]):
            draws.append(float(torch.rand(())))
            return step(batch)

        method.training_step = spy
        return method

    c = cfg(steps=4, checkpoint_every=2)
    full: list[float] = []
    resumed: list[float] = []
    fit(tmp_path, "a", make_spy(full), c)
    with pytest.raises(Kill):
        fit(tmp_path, "b", make_spy([]), c, extra=(KillAfter(3),))
    fit(tmp_path, "b", make_spy(resumed), c)
    assert len(full) == 4 and len(resumed) == 2
    assert resumed == full[2:]


def test_killed_daformer_run_resumes_to_identical_student_teacher_and_adamw(tmp_path: Path, crops64) -> None:
    def make_daformer():
        model = toy_daformer()
        method = build_method("daformer", model, {"rcs": None, "w_fd": 0.005, "ignore_top": 2, "ignore_bottom": 15})
        method.set_normalization(TransformConfig())
        return method.networks(), method

    c = cfg(steps=4, checkpoint_every=2, optim=DAFORMER_OPTIM)
    assert_killed_run_resumes(tmp_path, make_daformer, c, kill_at=3, saved_at=2)
    header = (tmp_path / "a.csv").read_text().splitlines()[0].split(",")
    assert {"ce", "fd", "ce_mix", "pseudo_weight"} <= set(header) and "lr/teacher" not in header


def test_killed_dacs_run_resumes_to_identical_student_and_teacher(tmp_path: Path) -> None:
    def make_dacs():
        model = tiny_deeplab()
        method = build_method("dacs", model, {})
        method.set_normalization(TransformConfig())
        return method.networks(), method

    c = cfg(steps=4, checkpoint_every=2, optim=OptimConfig(lr=0.01, head_lr_mult=10.0))
    assert_killed_run_resumes(tmp_path, make_dacs, c, kill_at=3, saved_at=2)


# ---- 9. when the EMA runs, through the engine --------------------------------------------------------------------


class Record(Hook):
    """After each step (after the EMA hook): the student's and the teacher's parameters."""

    def __init__(self, method) -> None:
        self.method, self.student, self.teacher = method, [], []

    def after_step(self, trainer) -> None:
        self.student.append(params(self.method.model))
        self.teacher.append(params(self.method.teacher))


def run_two_steps(tmp_path: Path, method, c):
    """Zero the teacher (so that only the EMA rule can make it the student), train 2 steps; returns the student at
    the start, the teacher at each step's forward, the recorder, the trainer."""
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.zero_()
    start = params(method.model)
    at_forward: list[list[torch.Tensor]] = []
    method.teacher.register_forward_pre_hook(lambda m, _a: at_forward.append(params(m)))
    record = Record(method)
    trainer, rows = fit(tmp_path, "ema", method, c, extra=(record,))
    assert len(rows) == 2 and len(at_forward) == 2
    return start, at_forward, record, trainer


def test_dacs_teacher_becomes_the_student_after_step_0(tmp_path: Path) -> None:
    method = build_method("dacs", tiny_deeplab(), {})
    method.set_normalization(TransformConfig())
    start, at_forward, record, trainer = run_two_steps(tmp_path, method, cfg(steps=2, optim=OptimConfig(lr=0.01)))
    assert list(trainer.optimizers) == ["model"]
    s0, s1 = record.student
    assert any(not torch.equal(a, b) for a, b in zip(start, s0, strict=True))
    # step 0's forward: no update before the step (the zeroed teacher); after it alpha 0: the stepped student
    assert all(not p.any() for p in at_forward[0])
    assert_equal_params(record.teacher[0], s0, "teacher after step 0")
    assert_equal_params(at_forward[1], s0, "teacher at step 1's forward")
    # after step 1: alpha 1/2
    for t, a, b in zip(record.teacher[1], s0, s1, strict=True):
        torch.testing.assert_close(t, (a + b) / 2, rtol=0, atol=1e-7)


def test_daformer_teacher_is_the_starting_student_at_step_0s_forward(tmp_path: Path, crops64) -> None:
    model = toy_daformer()
    method = build_method("daformer", model, {"rcs": None, "ignore_top": 2, "ignore_bottom": 15})
    method.set_normalization(TransformConfig())
    start, at_forward, record, trainer = run_two_steps(tmp_path, method, cfg(steps=2, optim=DAFORMER_OPTIM))
    assert list(trainer.optimizers) == ["model"]
    assert {id(p) for g in trainer.optimizers["model"].param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}
    s0, s1 = record.student
    # before step 0's forward alpha 0 copies the starting student (not the stepped one)
    assert_equal_params(at_forward[0], start, "teacher at step 0's forward")
    assert_equal_params(record.teacher[0], start, "teacher after step 0 (no update after the step)")
    # before step 1's forward: alpha 1/2 of the starting student and the student after step 0
    for t, a, b in zip(at_forward[1], start, s0, strict=True):
        torch.testing.assert_close(t, (a + b) / 2, rtol=0, atol=1e-7)
    assert_equal_params(record.teacher[1], at_forward[1], "no update after step 1")
    assert all(not p.requires_grad for p in method.teacher.parameters())
    # the frozen FD encoder stayed out of training
    assert method.imnet is not None and not method.imnet.training
    assert all(torch.equal(a, b) for a, b in zip(method.imnet.state_dict().values(),
                                                  toy_daformer().backbone.state_dict().values(), strict=True))
