"""What every method relies on from the models: the output dict, upsampling chosen by the model, BatchNorm modes
(trainable, frozen affine in train mode as ADVENT, eval mode as CRST), and the EMA functions of the mean-teacher
spec (alpha at steps 0, 1 and large; parameters only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plca.engine.optim import OptimConfig, make_optimizer
from plca.models import FEATURE_MAPS, FEATURES, LOGITS, ema_alpha, ema_init_, ema_update_, upsample
from plca.models.daformer import DAFormerConfig, build_daformer
from plca.models.deeplabv2 import DeepLabV2Config, build_model
from plca.models.output import forward_pair

BN = dict(num_classes=19, depth=18, width=0.125, norm="batch", aspp_rates=(1, 2))


def test_forward_returns_the_output_dict_and_upsamples_its_own_way() -> None:
    x = torch.randn(2, 3, 32, 48)
    for align in (False, True):
        torch.manual_seed(0)
        model = build_model(DeepLabV2Config(**BN, align_corners=align)).eval()
        out = model(x)
        assert set(out) == {FEATURES, LOGITS} and out[LOGITS].shape == (2, 19, 4, 6)
        up = model.upsample(out[LOGITS], (32, 48))
        torch.testing.assert_close(up, nn.functional.interpolate(out[LOGITS], size=(32, 48), mode="bilinear",
                                                                 align_corners=align))
    assert upsample(x, (32, 48)) is x  # already at that size: untouched


def test_batchnorm_modes() -> None:
    x = torch.randn(4, 3, 32, 48) * 3 + 1
    modes = {}
    for mode in ("train", "frozen_affine", "eval", "frozen"):
        torch.manual_seed(0)
        model = build_model(DeepLabV2Config(**BN, bn_mode=mode)).train()
        bn = model.backbone.bn1
        before = bn.running_mean.clone()
        model(x)[LOGITS].sum().backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        modes[mode] = (bn.training, not torch.equal(before, bn.running_mean), "backbone.bn1.weight" in trainable)
        opt = make_optimizer(model, OptimConfig())
        assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    # (BatchNorm in train mode, running statistics moved, affine optimised)
    assert modes == {"train": (True, True, True), "frozen_affine": (True, True, False), "eval": (False, False, True),
                     "frozen": (False, False, False)}


def test_ema_alpha_at_steps_0_1_and_large() -> None:
    assert ema_alpha(0) == 0.0
    assert ema_alpha(1) == 0.5
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(10**6) == 0.999
    assert ema_alpha(10**6, 0.99) == 0.99


def test_ema_moves_parameters_only() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    student[1].running_mean.fill_(5.0)
    ema_init_(teacher, student)
    assert torch.equal(teacher[0].weight, student[0].weight)
    assert torch.equal(teacher[1].running_mean, torch.zeros(4))  # buffers are not copied
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t_old = teacher[0].weight.detach().clone()
    alpha = ema_update_(teacher, student, step=3, alpha_max=0.999)
    assert alpha == 0.75
    torch.testing.assert_close(teacher[0].weight, 0.75 * t_old + 0.25 * student[0].weight)
    assert torch.equal(teacher[1].running_mean, torch.zeros(4))
    assert not any(p.requires_grad and p.grad is not None for p in teacher.parameters())
    # float64 in, float64 out
    s64, t64 = nn.Linear(2, 2).double(), nn.Linear(2, 2).double()
    ema_update_(t64, s64, 5)
    assert t64.weight.dtype == torch.float64


def _passes(model: nn.Module) -> list[int]:
    """Records the batch size of every forward pass of `model`."""
    sizes: list[int] = []
    model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes


def test_forward_pair_stacks_per_sample_models_only() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 32, 48, generator=g), torch.randn(3, 3, 32, 48, generator=g)
    torch.manual_seed(0)
    gn = build_model(DeepLabV2Config(**{**BN, "norm": "group", "groups": 4}))
    passes = _passes(gn)
    out_a, out_b = forward_pair(gn, a, b)
    assert passes == [5] and gn.per_sample()  # one pass of both batches
    with torch.no_grad():
        for got, x in ((out_a, a), (out_b, b)):
            want = gn(x)
            assert set(got) == set(want)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    (out_a[LOGITS].sum() + 2 * out_b[LOGITS].sum()).backward()  # both halves reach the weights
    assert gn.classifier.branches[0].weight.grad.abs().sum() > 0
    forward_pair(gn, a, b[..., :40])
    assert passes[-2:] == [2, 3]  # two image sizes: two passes

    torch.manual_seed(0)
    bn = build_model(DeepLabV2Config(**BN)).train()
    twin = build_model(DeepLabV2Config(**BN)).train()
    twin.load_state_dict(bn.state_dict())
    passes = _passes(bn)
    out_a, out_b = forward_pair(bn, a, b)
    assert passes == [2, 3] and not bn.per_sample()  # batch statistics: each batch its own pass
    torch.testing.assert_close(out_a[LOGITS], twin(a)[LOGITS], rtol=0, atol=0)
    torch.testing.assert_close(out_b[LOGITS], twin(b)[LOGITS], rtol=0, atol=0)
    assert torch.equal(bn.backbone.bn1.running_mean, twin.backbone.bn1.running_mean)
    bn.eval()
    forward_pair(bn, a, b)
    assert passes[-1] == 5 and bn.per_sample()  # running statistics: stacking changes nothing


def test_forward_pair_splits_every_output_of_a_mit() -> None:
    torch.manual_seed(0)
    mit = build_daformer(DAFormerConfig(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                                        head_embed_dims=16, num_classes=5)).eval()  # eval: BatchNorm in the head
    a, b = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = forward_pair(mit, a, b)
        for got, x in ((out_a, a), (out_b, b)):
            want = mit(x)
            torch.testing.assert_close(got[LOGITS], want[LOGITS], rtol=1e-4, atol=1e-5)
            assert len(got[FEATURE_MAPS]) == len(want[FEATURE_MAPS]) == 4
            for m, w in zip(got[FEATURE_MAPS], want[FEATURE_MAPS], strict=True):
                torch.testing.assert_close(m, w, rtol=1e-4, atol=1e-5)
