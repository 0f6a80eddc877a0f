"""The adversarial / entropy methods of spec adversarial.md (AdaptSegNet, AdvEnt, multi-level MinEnt): where each
term's gradient goes, the released codes' labels and lambdas checked against hand computation from the model's
outputs, the networks and options each method declares, exact resume of a run with three networks, and a few
steps end to end through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import assert_killed_run_resumes, cfg, fit
from torch import nn
from torch.nn import functional as F

from plca.config import ConfigError
from plca.engine.optim import OptimConfig
from plca.losses import SOURCE_LABEL
from plca.methods import METHODS, build_method
from plca.methods.adaptsegnet import AdaptSegNet, AdaptSegNetConfig
from plca.methods.advent import AdvEnt, AdvEntConfig
from plca.methods.base import adversarial_terms, segmentation_supervision
from plca.methods.minent import MinEntConfig
from plca.models import AUX_LOGITS, LOGITS, fc_discriminator
from plca.models.deeplabv2 import DeepLabV2Config, build_model

F64 = torch.float64
C = 19  # the engine tests' streams label 19 classes
TINY = dict(num_classes=C, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2), align_corners=True)
SMALL_D = {"ndf": 4}
ADVERSARIAL = ("adaptsegnet", "advent")


def tiny(aux: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(DeepLabV2Config(**TINY, aux_head=aux)).train()


def batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Two 32x48 source images with 8x8-block labels (a few ignored) and two target images of another law."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, C, (2, 4, 6)), np.ones((8, 8), np.int64))
    labels[0, :3] = 255
    return {"source_image": torch.from_numpy(rng.normal(0, 1, (2, 3, 32, 48))).to(dtype),
            "source_label": torch.from_numpy(labels),
            "target_image": torch.from_numpy(rng.normal(1, 2, (2, 3, 32, 48))).to(dtype)}


def make64(name: str, options: dict, aux: bool = True):
    """Method `name` on a float64 tiny model, its discriminators in float64 too."""
    model = tiny(aux)
    method = build_method(name, model, {**SMALL_D, **options})
    for net in method.networks().values():
        net.double()
    return model, method


def up(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """ADVENT Eq. 2, mean over pixels, written out."""
    p = logits.softmax(1)
    return (-(p * p.log()).sum(1) / math.log(logits.shape[1])).mean()


# Hand-written adversarial losses against the constant labels (released codes: source 0, target 1).
HAND = {"bce": (lambda d: F.softplus(d).mean(), lambda d: F.softplus(-d).mean()),
        "ls": (lambda d: d.square().mean(), lambda d: (d - 1).square().mean())}


def hand_terms(method, b: dict[str, torch.Tensor], gan: str, d_input) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(segmenter part, discriminator part, terms) of the objective, recomputed by hand from fresh forwards."""
    model, cfg = method.model, method.cfg
    xs, ys, xt = b["source_image"], b["source_label"], b["target_image"]
    out_s, out_t = model(xs), model(xt)
    ce = F.cross_entropy(up(out_s[LOGITS], ys.shape[-2:]), ys, ignore_index=255)
    terms = {"ce": ce}
    seg = ce
    levels = {"main": (LOGITS, cfg.w_adv_main)}
    if cfg.multi_level:
        terms["ce_aux"] = F.cross_entropy(up(out_s[AUX_LOGITS], ys.shape[-2:]), ys, ignore_index=255)
        seg = seg + cfg.w_seg_aux * terms["ce_aux"]
        levels["aux"] = (AUX_LOGITS, cfg.w_adv_aux)
    disc = torch.zeros((), dtype=ce.dtype)
    to_source, to_target = HAND[gan]
    for level, (key, w) in levels.items():
        d = method.discriminators[f"d_{level}"]
        x_s, x_t = d_input(up(out_s[key], xs.shape[-2:])), d_input(up(out_t[key], xt.shape[-2:]))
        terms[f"adv_{level}"] = to_source(d(x_t))
        terms[f"d_{level}"] = to_source(d(x_s.detach())) / 2 + to_target(d(x_t.detach())) / 2
        seg = seg + w * terms[f"adv_{level}"]
        disc = disc + terms[f"d_{level}"]
    return seg, disc, terms


def softmax_input(z: torch.Tensor) -> torch.Tensor:
    return z.softmax(1)


def self_information_input(z: torch.Tensor) -> torch.Tensor:
    p = z.softmax(1)
    return -p * p.log() / math.log(z.shape[1])


CASES = {  # name -> (method, options, gan, the discriminator's input written out)
    "adaptsegnet": ("adaptsegnet", {}, "bce", softmax_input),
    "adaptsegnet_ls": ("adaptsegnet", {"gan": "ls"}, "ls", softmax_input),
    "adaptsegnet_ls_single": ("adaptsegnet", {"gan": "ls", "multi_level": False, "w_adv_main": 0.01}, "ls",
                              softmax_input),
    "advent": ("advent", {}, "bce", self_information_input),
    "advent_single": ("advent", {"multi_level": False}, "bce", self_information_input),
}


# ---- the shared pieces -----------------------------------------------------------------------------------------


def test_adversarial_terms_send_each_gradient_to_its_own_network() -> None:
    model = tiny().double()
    disc = fc_discriminator(C, ndf=4).double()
    b = batch(dtype=F64)
    maps = [up(model(b[k])[LOGITS], (32, 48)).softmax(1) for k in ("source_image", "target_image")]
    gen, dis = adversarial_terms(disc, *maps, "bce")
    assert all(p.requires_grad for p in disc.parameters())  # restored
    reached = [p for n, p in model.named_parameters() if not n.startswith("aux_classifier.")]  # main level only
    aux_head = list(model.aux_classifier.parameters())

    (0.01 * gen).backward(retain_graph=True)
    assert all(p.grad is not None for p in reached)
    assert sum(bool(p.grad.abs().sum() > 0) for p in reached) > 0.9 * len(reached)
    assert all(p.grad is None for p in aux_head)
    assert all(p.grad is None for p in disc.parameters())  # D frozen in the generator term

    model.zero_grad(set_to_none=True)
    dis.backward()
    assert all(p.grad is None for p in model.parameters())  # detached maps: not the segmenter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_adversarial_terms_restore_requires_grad_as_they_were_even_on_error() -> None:
    disc = fc_discriminator(C, ndf=4)
    disc[0].bias.requires_grad_(False)
    before = [p.requires_grad for p in disc.parameters()]
    x = torch.rand(1, C, 32, 32)
    adversarial_terms(disc, x, x)
    assert [p.requires_grad for p in disc.parameters()] == before
    with pytest.raises(RuntimeError):
        adversarial_terms(disc, x, torch.rand(1, C + 1, 32, 32))  # wrong channel count: D's forward fails
    assert [p.requires_grad for p in disc.parameters()] == before


class ConstantD(nn.Module):
    """A discriminator whose output is the constant c everywhere (weights 0, bias c)."""

    def __init__(self, c: float, channels: int = C) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 4, stride=2, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_generator_labels_target_predictions_source() -> None:
    c = 2.0
    x = torch.rand(2, C, 32, 48, dtype=F64)
    d = ConstantD(c).double()
    gen, dis = adversarial_terms(d, x, x, "bce")
    sp = F.softplus(torch.tensor(c, dtype=F64))
    assert gen.item() == pytest.approx(sp.item(), rel=1e-14)  # BCE(c, SOURCE_LABEL = 0) = log(1 + e^c)
    assert dis.item() == pytest.approx((sp / 2 + F.softplus(torch.tensor(-c, dtype=F64)) / 2).item(), rel=1e-14)
    gen, dis = adversarial_terms(d, x, x, "ls")  # least squares: mean (d - y)^2
    assert gen.item() == pytest.approx(c**2, rel=1e-14)
    assert dis.item() == pytest.approx(c**2 / 2 + (c - 1) ** 2 / 2, rel=1e-14)
    assert SOURCE_LABEL == 0.0


def test_segmentation_supervision_adds_the_weighted_aux_ce_and_lovasz_on_main() -> None:
    model = tiny().double()
    b = batch(dtype=F64)
    outs = model(b["source_image"])
    ys = b["source_label"]
    ce, ce_aux = (F.cross_entropy(up(outs[k], (32, 48)), ys, ignore_index=255) for k in (LOGITS, AUX_LOGITS))
    got = segmentation_supervision(model, outs, ys, lovasz=False, w_lov=0.75, w_seg_aux=0.1, ignore_index=255)
    assert got.loss.item() == pytest.approx((ce + 0.1 * ce_aux).item(), rel=1e-12)
    assert got.terms == pytest.approx({"ce": ce.item(), "ce_aux": ce_aux.item()}, rel=1e-12)
    no_aux = segmentation_supervision(model, {LOGITS: outs[LOGITS]}, ys, lovasz=False, w_lov=0.75, w_seg_aux=0.1,
                                      ignore_index=255)
    off = segmentation_supervision(model, outs, ys, lovasz=False, w_lov=0.75, w_seg_aux=0.0, ignore_index=255)
    for out in (no_aux, off):
        assert set(out.terms) == {"ce"} and out.loss.item() == pytest.approx(ce.item(), rel=1e-12)
    lov = segmentation_supervision(model, outs, ys, lovasz=True, w_lov=0.5, w_seg_aux=0.1, ignore_index=255)
    assert set(lov.terms) == {"ce", "lovasz", "ce_aux"}
    assert lov.loss.item() == pytest.approx((ce + 0.1 * ce_aux).item() + 0.5 * lov.terms["lovasz"], rel=1e-12)


# ---- AdaptSegNet and AdvEnt --------------------------------------------------------------------------------------


def test_configs_default_to_the_released_recipes() -> None:
    for cls in (AdaptSegNetConfig, AdvEntConfig):
        c = cls()
        assert (c.multi_level, c.w_adv_main, c.w_adv_aux, c.w_seg_aux, c.ndf) == (True, 0.001, 0.0002, 0.1, 64)
        assert (c.d_optim.name, c.d_optim.lr, c.d_optim.betas, c.d_optim.weight_decay) == ("adam", 1e-4,
                                                                                            (0.9, 0.99), 0.0)
        assert (c.lovasz, c.w_lov, c.ignore_index) == (False, 0.75, 255)
    assert AdaptSegNetConfig().gan == "bce" and not hasattr(AdvEntConfig(), "gan")
    assert AdaptSegNetConfig().d_optim is not AdaptSegNetConfig().d_optim  # a fresh default each
    m = MinEntConfig()
    assert (m.w_ent, m.w_ent_aux, m.multi_level, m.w_seg_aux, m.lovasz) == (0.001, 0.0002, True, 0.1, False)
    assert METHODS["adaptsegnet"] == (AdaptSegNet, AdaptSegNetConfig) and METHODS["advent"] == (AdvEnt, AdvEntConfig)
    # options come from params as plain dicts, validated
    method = build_method("adaptsegnet", tiny(), {"gan": "ls", "d_optim": {"name": "adam", "lr": 2e-4,
                                                                            "betas": [0.9, 0.99]}, **SMALL_D})
    assert method.gan == "ls" and method.cfg.d_optim.lr == 2e-4 and method.cfg.d_optim.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="gan"):
        build_method("adaptsegnet", tiny(), {"gan": "wgan"})
    with pytest.raises(ConfigError, match="unknown key"):
        build_method("advent", tiny(), {"gan": "ls"})  # ADVENT's loss is BCE, not an option


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_networks_optimizers_and_model_options_per_level(name: str) -> None:
    base = OptimConfig(lr=2.5e-4, head_lr_mult=10.0)
    cls = METHODS[name][0]
    multi = build_method(name, tiny(), SMALL_D)
    assert list(multi.networks()) == ["model", "d_main", "d_aux"]
    assert multi.optimizers(base) == {"model": base, "d_main": multi.cfg.d_optim, "d_aux": multi.cfg.d_optim}
    assert cls.model_options(multi.cfg) == {"aux_head": True}
    d = multi.networks()["d_main"]
    assert d[0].in_channels == C and d[0].out_channels == 4 and multi.networks()["d_aux"] is not d
    single = build_method(name, tiny(aux=False), {**SMALL_D, "multi_level": False})
    assert list(single.networks()) == ["model", "d_main"]
    assert list(single.optimizers(base)) == ["model", "d_main"]
    assert cls.model_options(single.cfg) == {}
    assert set(single.training_step(batch()).terms) == {"ce", "adv_main", "d_main"}
    with pytest.raises(ValueError, match="aux_head"):  # multi-level on a model without the aux head
        build_method(name, tiny(aux=False), SMALL_D).training_step(batch())


@pytest.mark.parametrize("case", sorted(CASES))
def test_objective_equals_the_hand_computed_terms_and_sends_each_gradient_home(case: str) -> None:
    name, options, gan, d_input = CASES[case]
    # hand-set lambdas, large enough to show in the sum; the aux lambda 0 in one case
    lambdas = {"w_adv_main": 0.3, "w_adv_aux": 0.0 if case == "advent" else 0.7}
    model, method = make64(name, {**lambdas, **options})
    b = batch(dtype=F64)
    out = method.training_step(b)
    d_params = [p for k, net in method.networks().items() if k != "model" for p in net.parameters()]
    assert d_params and all(p.requires_grad for p in d_params)  # restored after the step
    seg_params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, seg_params + d_params, allow_unused=True)

    seg, disc, terms = hand_terms(method, b, gan, d_input)
    assert out.loss.item() == pytest.approx((seg + disc).item(), rel=1e-12)
    assert out.terms == pytest.approx({k: v.item() for k, v in terms.items()}, rel=1e-12)
    levels = 2 if method.cfg.multi_level else 1
    assert len(method.networks()) == 1 + levels and len(out.terms) == 3 * levels  # ce(, ce_aux), adv_l, d_l
    # the objective's gradient on D is the D terms' alone (the generator term adds nothing to D) ...
    want_d = torch.autograd.grad(disc, d_params)
    for g, w in zip(got[len(seg_params):], want_d, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    # ... and on the segmenter that of L_seg + sum lambda x generator (the D terms add nothing to it)
    want_seg = torch.autograd.grad(seg, seg_params, allow_unused=True)
    for g, w in zip(got[:len(seg_params)], want_seg, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gan", ["bce", "ls"])
def test_adaptsegnet_generator_term_with_a_constant_discriminator(gan: str) -> None:
    c = -1.5
    _, method = make64("adaptsegnet", {"gan": gan})
    method.discriminators["d_main"] = ConstantD(c).double()
    out = method.training_step(batch(dtype=F64))
    t = torch.tensor(c, dtype=F64)
    want = F.softplus(t) if gan == "bce" else t.square()  # the target prediction labelled source (0)
    assert out.terms["adv_main"] == pytest.approx(want.item(), rel=1e-12)
    want_d = (F.softplus(t) / 2 + F.softplus(-t) / 2) if gan == "bce" else (t**2 / 2 + (t - 1) ** 2 / 2)
    assert out.terms["d_main"] == pytest.approx(want_d.item(), rel=1e-12)


# ---- MinEnt ----------------------------------------------------------------------------------------------------


def test_minent_multi_level_by_hand() -> None:
    model = tiny()
    method = build_method("minent", model, {})
    assert type(method).model_options(method.cfg) == {"aux_head": True}
    b = batch()
    out = method.training_step(b)
    ys, xt = b["source_label"], b["target_image"]
    out_s, out_t = model(b["source_image"]), model(xt)
    ce, ce_aux = (F.cross_entropy(up(out_s[k], (32, 48)), ys, ignore_index=255) for k in (LOGITS, AUX_LOGITS))
    e_main, e_aux = (entropy(up(out_t[k], (32, 48))) for k in (LOGITS, AUX_LOGITS))
    assert out.terms == pytest.approx({"ce": ce.item(), "ce_aux": ce_aux.item(), "entropy_t": e_main.item(),
                                       "entropy_t_aux": e_aux.item()}, rel=1e-5)
    want = ce + 0.1 * ce_aux + 0.001 * e_main + 0.0002 * e_aux
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    # the weights, one by one: 0.001 and 0.0002 are too small to tell apart in a float32 sum
    for opts, w_main, w_aux in (({"w_ent": 0.5, "w_ent_aux": 0.0}, 0.5, 0.0), ({"w_ent": 0.0, "w_ent_aux": 0.5}, 0.0,
                                                                                0.5)):
        loss = build_method("minent", model, opts).training_step(b).loss
        want = ce + 0.1 * ce_aux + w_main * e_main + w_aux * e_aux
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_minent_single_level_has_no_aux_terms() -> None:
    method = build_method("minent", tiny(), {"multi_level": False})
    assert type(method).model_options(method.cfg) == {}
    assert set(method.training_step(batch()).terms) == {"ce", "entropy_t"}
    with pytest.raises(ValueError, match="aux_head"):
        build_method("minent", tiny(aux=False), {}).training_step(batch())


# ---- through the engine ----------------------------------------------------------------------------------------


def test_killed_adversarial_run_resumes_to_identical_model_discriminators_and_adam_states(tmp_path: Path) -> None:
    def make_adaptsegnet():
        model = tiny()
        method = build_method("adaptsegnet", model, {**SMALL_D, "d_optim": {"name": "adam", "lr": 1e-3,
                                                                              "betas": [0.9, 0.99],
                                                                              "weight_decay": 0.0}})
        return method.networks(), method

    c = cfg(steps=4, checkpoint_every=2, optim=OptimConfig(lr=0.01, head_lr_mult=10.0))
    assert_killed_run_resumes(tmp_path, make_adaptsegnet, c, kill_at=3, saved_at=2)
    header = (tmp_path / "a.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "lr", "lr/d_main", "lr/d_aux"]


@pytest.mark.parametrize("case", ["adaptsegnet", "adaptsegnet_ls_single", "advent", "minent"])
def test_each_method_trains_end_to_end(tmp_path: Path, case: str) -> None:
    name, options = ("minent", {}) if case == "minent" else CASES[case][:2]
    model = tiny(aux=options.get("multi_level", True))
    method = build_method(name, model, {**options, **({} if name == "minent" else SMALL_D)})
    nets = method.networks()
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
    trainer, rows = fit(tmp_path, case, method, cfg(steps=2))
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    for k, net in nets.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[k], net.parameters(), strict=True)), k
    for k in nets:
        if k != "model":
            opt = trainer.optimizers[k]
            assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["betas"] == (0.9, 0.99)
            assert all(f"{k}" in r and np.isfinite(r[k]) for r in rows)
