"""The public API of the adversarial baselines (AdaptSegNet, ADVENT, IntraDA; spec adversarial.md): the
self-information map, the adversarial losses and labels, the fully convolutional discriminator, IntraDA's image
entropy and easy/hard split, DeepLab-v2's auxiliary head on layer3, and where the gradients of the generator and
discriminator terms go."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from plca.engine.optim import OptimConfig, make_optimizer
from plca.losses import (
    SOURCE_LABEL,
    TARGET_LABEL,
    adversarial_loss,
    entropy_map,
    self_information_map,
)
from plca.models import AUX_LOGITS, FEATURES, LOGITS, ResNet, fc_discriminator
from plca.models.deeplabv2 import DeepLabV2Config, build_model
from plca.pseudo import CITYSCAPES_RARE_CLASSES, entropy_rank_split, image_entropy

F64 = torch.float64
BN = dict(num_classes=19, depth=18, width=0.125, norm="batch", aspp_rates=(1, 2))
LOG2, LOG3 = math.log(2.0), math.log(3.0)


# ---- self-information map and adversarial losses ---------------------------------------------------------------


def test_self_information_map_on_two_classes_by_hand() -> None:
    # pixel 0: p = (1/2, 1/2) -> 1/2 each; pixel 1: p = (1/4, 3/4) -> 1/4 log2 4 = 1/2 and 3/4 log2(4/3)
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, LOG3]]]], dtype=F64)  # [1, 2, 1, 2]
    info = self_information_map(logits)
    assert info.shape == (1, 2, 1, 2) and info.dtype == F64
    expected = torch.tensor([[[[0.5, 0.5]], [[0.5, 0.75 * math.log2(4 / 3)]]]], dtype=F64)
    torch.testing.assert_close(info, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(info.sum(1), entropy_map(logits), rtol=1e-14, atol=0)


def test_self_information_sums_over_classes_to_the_entropy_map() -> None:
    logits = torch.randn(2, 19, 3, 5, generator=torch.Generator().manual_seed(0), dtype=F64) * 4
    info = self_information_map(logits)
    assert info.dtype == F64 and (info >= 0).all()
    torch.testing.assert_close(info.sum(1), entropy_map(logits), rtol=1e-13, atol=1e-15)
    assert self_information_map(logits.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"self_information_map expects logits \[N, C, H, W\]"):
        self_information_map(torch.zeros(2, 3))


def test_adversarial_loss_bce_and_ls_by_hand() -> None:
    zeros = torch.zeros(2, 1, 3, 4, dtype=F64)
    for label in (SOURCE_LABEL, TARGET_LABEL):  # a logit of 0 is p = 1/2 whatever the label
        loss = adversarial_loss(zeros, label)
        assert loss.dim() == 0 and loss.dtype == F64
        assert loss.item() == pytest.approx(LOG2, rel=1e-15)
    d = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    # BCE with logits: label 1 -> log(1 + e^-d), label 0 -> log(1 + e^d); mean over the entries
    assert adversarial_loss(d, 1.0).item() == pytest.approx(
        (LOG2 + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 3, rel=1e-14)
    assert adversarial_loss(d, 0.0, gan="bce").item() == pytest.approx(
        (LOG2 + math.log1p(math.exp(2.0)) + math.log1p(math.exp(-1.0))) / 3, rel=1e-14)
    # least squares: mean (d - y)^2
    assert adversarial_loss(d, 1.0, gan="ls").item() == pytest.approx((1 + 1 + 4) / 3, rel=1e-15)
    assert adversarial_loss(d.reshape(1, 1, 1, 3), 0.0, gan="ls").item() == pytest.approx(5 / 3, rel=1e-15)
    assert adversarial_loss(d.float(), 1.0, gan="ls").dtype == torch.float32
    assert (SOURCE_LABEL, TARGET_LABEL) == (0.0, 1.0)  # the released codes' convention
    with pytest.raises(ValueError, match="'wgan'"):
        adversarial_loss(d, 1.0, gan="wgan")


# ---- the discriminator -----------------------------------------------------------------------------------------


def test_fc_discriminator_layout_shapes_and_float64() -> None:
    d = fc_discriminator(19)
    kinds = [type(m) for m in d]
    assert kinds == [nn.Conv2d, nn.LeakyReLU] * 4 + [nn.Conv2d]
    assert all(m.negative_slope == 0.2 for m in d if isinstance(m, nn.LeakyReLU))
    assert list(d.state_dict()) == [f"{i}.{p}" for i in (0, 2, 4, 6, 8) for p in ("weight", "bias")]
    shapes = [tuple(d.state_dict()[f"{i}.weight"].shape) for i in (0, 2, 4, 6, 8)]
    assert shapes == [(64, 19, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4), (512, 256, 4, 4), (1, 512, 4, 4)]
    for conv in d[::2]:
        assert (conv.stride, conv.padding, conv.kernel_size) == ((2, 2), (1, 1), (4, 4))

    small = fc_discriminator(19, ndf=4)
    assert small(torch.randn(2, 19, 64, 128)).shape == (2, 1, 2, 4)  # each side halved (floored) five times
    assert small(torch.randn(1, 19, 50, 100)).shape == (1, 1, 1, 3)  # 50 -> 25, 12, 6, 3, 1; 100 -> ... 3
    small64 = small.double()
    out = small64(torch.randn(1, 19, 64, 64, dtype=F64))
    assert out.dtype == F64 and adversarial_loss(out, SOURCE_LABEL).dtype == F64


def test_generator_term_reaches_the_segmenter_only_and_the_discriminator_term_the_discriminator_only() -> None:
    torch.manual_seed(0)
    seg = build_model(DeepLabV2Config(**{**BN, "num_classes": 4})).double().train()
    disc = fc_discriminator(4, ndf=4).double()
    x_s, x_t = torch.randn(1, 3, 64, 64, dtype=F64), torch.randn(1, 3, 64, 64, dtype=F64)
    # upsampled to the input size, as the methods feed D (8 x 8 logits would not survive five halvings)
    logits_s, logits_t = (seg.upsample(seg(x)[LOGITS], (64, 64)) for x in (x_s, x_t))
    map_s, map_t = self_information_map(logits_s), self_information_map(logits_t)

    disc.requires_grad_(False)  # the generator term: D frozen
    gen = adversarial_loss(disc(map_t), SOURCE_LABEL)
    disc.requires_grad_(True)
    dis = (adversarial_loss(disc(map_s.detach()), SOURCE_LABEL) / 2
           + adversarial_loss(disc(map_t.detach()), TARGET_LABEL) / 2)

    seg_params = [p for p in seg.parameters() if p.requires_grad]
    d_params = list(disc.parameters())
    gen_grads = torch.autograd.grad(gen, [logits_t, *seg_params, *d_params], retain_graph=True, allow_unused=True)
    assert gen_grads[0].abs().sum() > 0  # reaches the segmenter's output ...
    assert all(g is None for g in gen_grads[1 + len(seg_params):])  # ... and no D parameter
    dis_grads = torch.autograd.grad(dis, [*seg_params, *d_params], retain_graph=True, allow_unused=True)
    assert all(g is None for g in dis_grads[:len(seg_params)])  # detached inputs: not the segmenter
    assert all(g is not None and g.abs().sum() > 0 for g in dis_grads[len(seg_params):])

    # plca's single summed objective gives each side exactly its own term's gradient
    summed = torch.autograd.grad(gen + dis, [logits_t, *d_params])
    torch.testing.assert_close(summed[0], gen_grads[0], rtol=1e-12, atol=0)
    for got, want in zip(summed[1:], dis_grads[len(seg_params):], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ---- IntraDA's ranking -----------------------------------------------------------------------------------------


def test_image_entropy_with_and_without_rare_classes_by_hand() -> None:
    a = [0.0, math.log(2.0), LOG3]  # p = (1/6, 2/6, 3/6), argmax 2
    b = [0.0, LOG3, math.log(2.0)]  # same p permuted, argmax 1
    u = [0.0, 0.0, 0.0]  # uniform: entropy 1, argmax 0 (first of the ties)
    logits = torch.tensor([[a, b], [u, a]], dtype=F64).permute(0, 2, 1)[:, :, None, :]  # [2, 3, 1, 2]
    e6 = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2)) / LOG3
    plain = image_entropy(logits)
    assert plain.shape == (2,) and plain.dtype == F64
    torch.testing.assert_close(plain, torch.tensor([e6, (1 + e6) / 2], dtype=F64), rtol=1e-14, atol=0)
    # factor (K - k) / K + 0.5, k = rare classes present in the argmax: image 0 shows {2, 1}, image 1 {0, 2}
    torch.testing.assert_close(image_entropy(logits, (1, 2)), plain * torch.tensor([0.5, 1.0], dtype=F64))
    torch.testing.assert_close(image_entropy(logits, [1]), plain * torch.tensor([0.5, 1.5], dtype=F64))
    torch.testing.assert_close(image_entropy(logits, (7, 8)), plain * 1.5)  # none present
    with pytest.raises(ValueError, match="empty"):
        image_entropy(logits, ())


def test_image_entropy_with_cityscapes_rare_classes() -> None:
    assert CITYSCAPES_RARE_CLASSES == (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)
    logits = torch.zeros(1, 19, 1, 4, dtype=F64)
    for j, c in enumerate((3, 4, 0, 13)):  # two rare classes (wall, fence) predicted, two common ones
        logits[0, c, 0, j] = 5.0
    expected = entropy_map(logits).mean() * (9 / 11 + 0.5)
    assert image_entropy(logits, CITYSCAPES_RARE_CLASSES).item() == pytest.approx(expected.item(), rel=1e-14)


def test_entropy_rank_split_is_stable_ascending_and_floors_the_float_product() -> None:
    scores = torch.tensor([0.5, 0.1, 0.5, 0.1, 0.3])
    easy, hard = entropy_rank_split(scores)
    assert easy.dtype == hard.dtype == torch.int64
    assert easy.tolist() == [1, 3, 4] and hard.tolist() == [0, 2]  # int(5 * 0.67) = 3; ties in input order
    ties = torch.zeros(100, dtype=F64)
    easy, hard = entropy_rank_split(ties)
    assert torch.equal(torch.cat([easy, hard]), torch.arange(100))  # a stable sort keeps every tie in place
    for n, ratio, n_easy in ((3, 0.67, 2), (10, 0.67, 6), (2975, 0.67, 1993), (100, 0.29, 28), (4, 0.0, 0),
                             (4, 1.0, 4)):
        # 100 * 0.29 = 28.999999999999996 as a float: floored to 28, as IntraDA's int(len * lambda)
        easy, hard = entropy_rank_split(torch.rand(n), ratio)
        assert (len(easy), len(hard)) == (n_easy, n - n_easy) == (int(n * ratio), n - int(n * ratio))
    with pytest.raises(ValueError, match=r"scores \[N\]"):
        entropy_rank_split(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ratio"):
        entropy_rank_split(torch.zeros(3), 1.5)


# ---- the auxiliary head ----------------------------------------------------------------------------------------


def _backbone_and_main_head_keys(model: nn.Module) -> bool:
    return all(k.startswith(("backbone.", "classifier.branches.")) for k in model.state_dict())


def test_aux_head_off_leaves_the_model_unchanged() -> None:
    x = torch.randn(2, 3, 32, 48)
    torch.manual_seed(0)
    default = build_model(DeepLabV2Config(**BN)).eval()
    torch.manual_seed(0)
    off = build_model(DeepLabV2Config(**BN, aux_head=False)).eval()
    torch.manual_seed(0)
    on = build_model(DeepLabV2Config(**BN, aux_head=True)).eval()
    assert list(off.state_dict()) == list(default.state_dict()) and _backbone_and_main_head_keys(off)
    assert not hasattr(off, "aux_classifier")
    out_off = off(x)
    assert set(out_off) == {FEATURES, LOGITS}
    # the option only adds: same seed -> same backbone and main head, same features and logits
    on_state = on.state_dict()
    assert [k for k in on_state if not k.startswith("aux_classifier.")] == list(off.state_dict())
    for k, v in off.state_dict().items():
        assert torch.equal(on_state[k], v), k
    out_on = on(x)
    assert torch.equal(out_on[FEATURES], out_off[FEATURES]) and torch.equal(out_on[LOGITS], out_off[LOGITS])


def test_resnet_last_two_stages_match_forward() -> None:
    torch.manual_seed(0)
    net = ResNet(18, 0.125, "group", 4).eval()
    assert {k.split(".")[0] for k in net.state_dict()} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    x = torch.randn(1, 3, 32, 48)
    c3, c4 = net.last_two_stages(x)
    assert torch.equal(c4, net(x))
    assert c3.shape == (1, net.layer3_channels, 4, 6) and c4.shape == (1, net.out_channels, 4, 6)


def test_aux_head_on_gives_aux_logits_at_the_head_lr_and_takes_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(DeepLabV2Config(**BN, aux_head=True)).train()
    out = model(torch.randn(2, 3, 32, 48))
    assert set(out) == {FEATURES, LOGITS, AUX_LOGITS}
    assert out[AUX_LOGITS].shape == out[LOGITS].shape == (2, 19, 4, 6)
    aux = dict(model.aux_classifier.named_parameters())
    assert len(aux) == 2 * len(BN["aspp_rates"])
    weights = torch.cat([p.flatten() for n, p in aux.items() if n.endswith("weight")])
    assert weights.std().item() == pytest.approx(0.01, rel=0.1)  # N(0, 0.01) as the main head
    assert all(p.abs().sum() > 0 for n, p in aux.items() if n.endswith("bias"))  # torch's default biases

    # every parameter outside `backbone.` gets the head's lr: the aux head's included
    opt = make_optimizer(model, OptimConfig(lr=1e-3, head_lr_mult=10.0))
    head_group = next(g for g in opt.param_groups if g["lr"] == pytest.approx(1e-2))
    assert all(any(p is q for q in head_group["params"]) for p in aux.values())

    # an aux loss reaches the aux head and layer3, not the main head nor layer4
    model.zero_grad()
    nn.functional.cross_entropy(out[AUX_LOGITS], torch.randint(0, 19, (2, 4, 6))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.values())
    assert all(p.grad is None for p in model.classifier.parameters())
    assert all(p.grad is None for p in model.backbone.layer4.parameters())
    assert all(p.grad is not None for p in model.backbone.layer3.parameters())
