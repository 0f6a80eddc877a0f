"""The adversarial family's recipes (profiles/adversarial.yaml under a method's overlay: advent, minent,
advent_minent, adaptsegnet, intrada, on a benchmark profile): merged, they carry the released codes' setup, and each
runs end to end at tiny sizes on fixtures in the real layouts, with the pipeline's own functions wired as the
stages wire them (models/<run>/s<seed>/model.pt, pseudo/<set>/s<seed>): pretrain (0 steps), the trained runs, the
pseudo-label set and round (IntraDA), the ensemble (AdvEnt+MinEnt), then the evaluation of what the recipe
evaluates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from real_formats import write_cityscapes, write_gta5, write_synthia
from test_profiles import DEFAULT, PROFILES, REPO, SOURCE, TINY_MODEL, write_params

from plca.config import load_yaml
from plca.engine.optim import make_optimizer
from plca.experiment import PRETRAIN, RunSpec, ensemble_run, evaluate_run, load_model, pseudo_label_run, train_run
from plca.labelling import read_names
from plca.models.deeplabv2 import DeepLabV2
from plca.models.ensemble import Ensemble
from plca.models.resnet import ResNet
from plca.params import Params
from plca.profiles import Merged, Overlay, compose

PROFILE_DIR = REPO / "profiles"
METHODS = ["advent", "minent", "advent_minent", "adaptsegnet", "intrada"]
#: What each recipe trains, assembles and evaluates (runs), beside the benchmark's oracle.
RUNS: dict[str, dict[str, Any]] = {
    "advent": {"adapt": ["advent"], "evaluate": ["advent", "oracle"]},
    "minent": {"adapt": ["minent"], "evaluate": ["minent", "oracle"]},
    "adaptsegnet": {"adapt": ["adaptsegnet"], "evaluate": ["adaptsegnet", "oracle"]},
    "advent_minent": {"adapt": ["advent", "minent"], "evaluate": ["advent", "minent", "advent_minent", "oracle"],
                      "ensembles": {"advent_minent": (("advent", "minent"), (0.5, 0.5))}},
    "intrada": {"adapt": ["intrada_s1"], "evaluate": ["intrada", "oracle"], "pseudo": {"intrada_rank": "intrada_s1"},
                "rounds": {"intrada": ("pretrain", "intrada_rank")}},
}
#: The released codes' EARLY_STOP / num-steps-stop (IntraDA: two stages of 120,000).
STEPS = {"advent": 120000, "minent": 120000, "advent_minent": 120000, "adaptsegnet": 150000, "intrada": 240000}
#: Methods with discriminators (each has its own Adam, `methods.<m>.d_optim`).
ADVERSARIAL = {"advent", "adaptsegnet"}
HORIZON = 250000  # the released codes' poly horizon (segmenter and discriminators alike)
LR, D_LR = 2.5e-4, 1e-4
#: Each end-to-end case: (benchmark, recipe).
CASES = [("gta5", m) for m in METHODS] + [("synthia", "intrada")]
#: Tiny sizes: the GTA5/SYNTHIA source resized to 64x36 (1280x720's aspect), Cityscapes to 64x32 (1024x512's).
TINY_SOURCE, TINY_TARGET, TINY_EVAL = [64, 36], [64, 32], [48, 24]
N_TARGET_TRAIN = 6  # IntraDA's ranking: int(6 * 0.67) = 4 easy, 2 hard


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from more


def stacked(bench: str, *names: str) -> Merged:
    """What `python -m plca.profile <bench> <names...>` writes: the default, then the benchmark and each overlay of
    profiles/."""
    overlays = [Overlay(name, PROFILE_DIR / f"{name}.yaml", load_yaml(PROFILE_DIR / f"{name}.yaml"))
                for name in (bench, *names)]
    assert overlays[0].path == PROFILES[bench]
    return compose(load_yaml(DEFAULT), overlays, DEFAULT)


def recipe(bench: str, method: str) -> Merged:
    """The adversarial family's recipe: `python -m plca.profile <bench> adversarial <method>`."""
    return stacked(bench, "adversarial", method)


def trained_methods(p: Params) -> set[str]:
    return {p.variant(v).train.method for v in [*p.runs.adapt, *p.runs.rounds]}


# ------------------------------------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("bench", sorted(PROFILES))
@pytest.mark.parametrize("method", METHODS)
def test_recipe_carries_the_released_setup(bench: str, method: str) -> None:
    p = recipe(bench, method).params
    assert p.profile == f"{bench}+adversarial+{method}"
    # 1 source + 1 target image per step
    assert (p.engine.batch_size, p.engine.grad_accum) == (1, 1)
    # SGD 2.5e-4 on the backbone, 10x on the heads, poly 0.9 over 250,000 iterations
    o = p.adapt.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.poly_power, o.poly_horizon, o.head_lr_mult) == (
        "sgd", LR, 0.9, 5e-4, 0.9, HORIZON, 10.0)
    assert (o.warmup_steps, o.custom_keys) == (0, {})
    # the discriminators' Adam decays over the same horizon
    for m in ADVERSARIAL:
        d = p.methods[m]["d_optim"]
        assert (d["name"], d["lr"], tuple(d["betas"]), d["weight_decay"], d["poly_power"], d["poly_horizon"]) == (
            "adam", D_LR, (0.9, 0.99), 0.0, 0.9, HORIZON), m
    for name in [*p.runs.adapt, *p.runs.rounds]:
        cfg = p.method_config(name)
        assert cfg.multi_level and not cfg.lovasz and cfg.w_seg_aux == 0.1, name
        if p.variant(name).train.method in ADVERSARIAL:
            d = cfg.d_optim
            assert (d.name, d.lr, d.betas, d.poly_horizon) == ("adam", D_LR, (0.9, 0.99), HORIZON), name
    # the model: frozen BatchNorm affine, align_corners as the codes; the aux head is the method's to add
    m = p.model
    assert (m.depth, m.norm, m.bn_mode, m.align_corners, m.aux_head) == (101, "batch", "frozen_affine", True, False)
    # fixed-size resizes per domain, no crop, no flip, no scaling; evaluation at 1024x512
    src, tgt = p.transform("source"), p.transform("target")
    assert (src.resize, src.short_edge, src.crop, src.flip) == ((1280, 720), None, None, False)
    assert (tgt.resize, tgt.short_edge, tgt.crop, tgt.flip) == ((1024, 512), None, None, False)
    assert (tgt.mean, tgt.std, tgt.channel_order, tgt.scale) == (src.mean, src.std, src.channel_order, src.scale)
    assert p.data.eval_size == (1024, 512)
    # the released steps; the pretrained model = the ImageNet-initialised one
    assert p.adapt.steps == STEPS[method] and p.pretrain.steps == 0
    for name in [*p.runs.adapt, *p.runs.rounds]:
        assert p.steps(name) == (150000 if method == "adaptsegnet" else 120000), name
    # the wiring: nothing of the benchmark's PLCA rows runs; the benchmark's oracle stays
    want = RUNS[method]
    r = p.runs
    assert (r.train_source, r.adapt, r.oracle, r.evaluate) == ([], want["adapt"], "oracle", want["evaluate"])
    assert r.pseudo == want.get("pseudo", {})
    assert {k: (w.init, w.pseudo) for k, w in r.rounds.items()} == want.get("rounds", {})
    assert {k: (tuple(w.members), tuple(w.weights)) for k, w in r.ensembles.items()} == want.get("ensembles", {})
    assert trained_methods(p) == ({"advent", "minent"} if method == "advent_minent"
                                  else {"advent"} if method == "intrada" else {method})
    if method == "intrada":
        assert [p.variant(v).train.steps_split for v in ("intrada_s1", "intrada")] == [2, 2]
        assert p.variant("intrada").train.labelled == "pseudo"
        s = p.pseudo["intrada_rank"]
        assert (s.policy, s.options, s.input_size, s.batch_size) == (
            "entropy_rank", {"ratio": 0.67, "rare_classes": False}, (1024, 512), 4)
    if method == "advent_minent":
        assert p.variant("advent_minent").train.method is None
    # what the benchmark sets and the recipe leaves alone
    assert p.data.protocol == (19 if bench == "gta5" else 16)
    assert (p.data.source.format, p.data.target.format) == (SOURCE[bench], "cityscapes")


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return write_fixtures(tmp_path_factory)


def write_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per benchmark: data in the real layouts (<root>/<source>, <root>/cityscapes: 6 train, 2 val images) and
    tiny ImageNet weights."""
    out = {}
    for bench in sorted(PROFILES):
        tmp = tmp_path_factory.mktemp(bench)
        root = tmp / "prepared"
        (write_gta5 if SOURCE[bench] == "gta5" else write_synthia)(root / SOURCE[bench], 4, size=(30, 50), seed=1)
        write_cityscapes(root / "cityscapes", {"train": N_TARGET_TRAIN, "val": 2}, size=(32, 64), seed=2)
        # a torchvision-layout state_dict (fc.* included) of the tiny backbone, as test_profiles writes it
        torch.manual_seed(123)
        backbone = ResNet(TINY_MODEL["depth"], TINY_MODEL["width"], "batch")
        state = {k: v + 0.01 if k.endswith("bn1.weight") else v for k, v in backbone.state_dict().items()}
        state["fc.weight"], state["fc.bias"] = torch.zeros(1000, backbone.out_channels), torch.zeros(1000)
        weights = tmp / "tiny-imagenet.pth"
        torch.save(state, weights)
        out[bench] = (root, weights)
    return out


def tiny_recipe(bench: str, method: str, root: Path, weights: Path, tmp: Path) -> Params:
    """The merged recipe with only its sizes made tiny (and the machine's settings: CPU, one thread, no loader
    processes, a log row per step, no tracking)."""
    raw = recipe(bench, method).raw
    d = raw["data"]
    d["root"] = str(root)
    d["source"]["root"] = str(root / SOURCE[bench])
    d["target"]["root"] = str(root / "cityscapes")
    d["eval_size"] = TINY_EVAL
    d["train_transform"]["resize"] = TINY_SOURCE
    d["target_transform"]["resize"] = TINY_TARGET
    raw["model"].update(TINY_MODEL, pretrained=str(weights))
    raw["engine"].update(num_workers=0, log_every=1, checkpoint_every=1, device="cpu", threads=1)
    steps = 4 if method == "intrada" else 2  # IntraDA: two stages of 2
    raw["adapt"]["steps"] = raw["oracle"]["steps"] = steps
    for s in raw["pseudo"].values():
        if s["input_size"] is not None:
            s["input_size"] = TINY_EVAL
    raw["evaluate"]["batch_size"] = 2
    raw["tracking"]["enabled"] = False
    return write_params(raw, tmp / "params.yaml")


def wired(p: Params, tmp: Path) -> tuple[Callable[[str], Path], Callable[[str], dict[str, Any]]]:
    """(model_path, train) of runs under `tmp`, as stages/_common.py lays them out and stages/train.py wires a run
    (a round from its `init` model on its set; every other run from the pretrained model), seed 0."""
    r = p.runs
    common = dict(tracking=p.tracking, tags={"profile": p.profile}, progress=False)

    def model_path(run: str) -> Path:
        return tmp / "models" / run / "s0" / "model.pt"

    def train(name: str) -> dict[str, Any]:
        wiring = r.rounds.get(name)
        return train_run(p, RunSpec(name, 0), out_dir=model_path(name).parent,
                         log_csv=tmp / "logs" / name / "s0.csv", checkpoint_dir=tmp / "ckpt" / name,
                         init_model=None if name == PRETRAIN else model_path(wiring.init if wiring else PRETRAIN),
                         pseudo_dir=tmp / "pseudo" / wiring.pseudo / "s0" if wiring else None, **common)

    return model_path, train


def poly(lr: float, steps: int) -> list[float]:
    return [lr * (1 - s / HORIZON) ** 0.9 for s in range(steps)]


def check_trained(p: Params, name: str, tmp: Path, pretrained: dict[str, torch.Tensor], res: dict[str, Any]) -> None:
    """A trained run: its steps, a multi-level model moved from its start (BatchNorm affine frozen), its log."""
    assert res["steps"] == p.steps(name) == 2
    model = load_model(tmp / "models" / name / "s0" / "model.pt")
    assert isinstance(model, DeepLabV2)
    assert (model.cfg.aux_head, model.cfg.bn_mode, model.cfg.align_corners) == (True, "frozen_affine", True)
    state = model.state_dict()
    aux = [k for k in state if k.startswith("aux_classifier.")]
    assert aux and not [k for k in pretrained if k.startswith("aux_classifier.")]
    for key in ("backbone.conv1.weight", "backbone.layer4.0.conv1.weight", "classifier.branches.0.weight"):
        assert not torch.equal(state[key], pretrained[key]), f"{name}: {key} did not move"
    # frozen_affine: BatchNorm's affine is not optimised (its statistics move: train mode)
    for key in ("backbone.bn1.weight", "backbone.bn1.bias", "backbone.layer3.0.bn2.weight"):
        torch.testing.assert_close(state[key], pretrained[key], rtol=0, atol=0, msg=f"{name}: {key}")
    assert not torch.equal(state["backbone.bn1.running_mean"], pretrained["backbone.bn1.running_mean"])
    # the heads (main and aux) at 10x the backbone's lr
    groups = make_optimizer(model, p.adapt.optim).param_groups
    assert [g["lr"] for g in groups] == [LR, LR * 10]
    assert any(p_ is next(iter(model.aux_classifier.parameters())) for p_ in groups[1]["params"])

    log = pd.read_csv(tmp / "logs" / name / "s0.csv")
    assert list(log["step"]) == [1, 2]
    np.testing.assert_allclose(log["lr"], poly(LR, 2), rtol=1e-12)
    assert log["lr"].iloc[1] < log["lr"].iloc[0]  # decaying over 250,000 steps, not the run's 2
    method = p.variant(name).train.method
    cols = set(log.columns)
    assert {"loss", "ce", "ce_aux"} <= cols and "lovasz" not in cols
    if method in ADVERSARIAL:
        assert {"adv_main", "adv_aux", "d_main", "d_aux"} <= cols
        for d in ("d_main", "d_aux"):  # each discriminator's Adam, 1e-4, poly over 250,000
            np.testing.assert_allclose(log[f"lr/{d}"], poly(D_LR, 2), rtol=1e-12)
    else:
        assert {"entropy_t", "entropy_t_aux"} <= cols and not {"adv_main", "d_main", "lr/d_main"} & cols
    assert np.isfinite(log.drop(columns="step").to_numpy()).all()


def check_metrics(p: Params, bench: str, name: str, m: dict[str, Any], tmp: Path) -> None:
    assert json.loads((tmp / "metrics" / name / "s0.json").read_text()) == m
    assert m["variant"] == name and 0 <= m["miou"] <= 100
    if bench == "gta5":
        assert m["miou"] == m["miou19"]
    else:
        assert m["miou"] == m["miou16"] and m["miou13"] is not None and 0 <= m["miou13"] <= 100
    assert all(v is None or 0 <= v <= 100 for v in m["iou"].values())
    assert m["source_val_miou"] is None and m["miou_without_tta"] is None  # no source val; no aggregation
    assert "cycles" not in m
    full = json.loads((tmp / "eval" / name / "s0" / "metrics.json").read_text())
    assert full["test_time_aggregation"] is False and "cycles" not in full
    sample = next((tmp / "eval" / name / "s0" / "samples").glob("*.png"))
    assert cv2.imread(str(sample), cv2.IMREAD_UNCHANGED).shape[:2] == (32, 64)  # the label size, not 48x24


@pytest.mark.parametrize(("bench", "method"), CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_recipe_trains_and_evaluates_end_to_end(bench: str, method: str, tmp_path: Path,
                                                fixtures: dict[str, tuple[Path, Path]]) -> None:
    p = tiny_recipe(bench, method, *fixtures[bench], tmp_path)
    # everything but sizes is the recipe's
    assert (p.engine.batch_size, p.engine.grad_accum, p.model.bn_mode, p.model.align_corners) == (
        1, 1, "frozen_affine", True)
    assert (p.adapt.optim.lr, p.adapt.optim.head_lr_mult, p.adapt.optim.poly_horizon) == (LR, 10.0, HORIZON)
    r = p.runs
    common = dict(tracking=p.tracking, tags={"profile": p.profile}, progress=False)
    model_path, train = wired(p, tmp_path)

    assert train(PRETRAIN)["steps"] == 0
    pretrained = load_model(model_path(PRETRAIN)).state_dict()
    assert load_model(model_path(PRETRAIN)).cfg.aux_head is False

    for name in r.adapt:
        check_trained(p, name, tmp_path, pretrained, train(name))
    for set_name, labeller in r.pseudo.items():  # IntraDA's entropy ranking of the stage-1 model
        out = tmp_path / "pseudo" / set_name / "s0"
        summary = pseudo_label_run(p, set_name, 0, model_path=model_path(labeller), out_dir=out, **common)
        easy = int(N_TARGET_TRAIN * p.pseudo[set_name].options["ratio"])
        assert (summary["labelled"], summary["unlabelled"]) == (easy, N_TARGET_TRAIN - easy) == (4, 2)
        labelled, unlabelled = read_names(out, "labelled"), read_names(out, "unlabelled")
        assert (len(labelled), len(unlabelled)) == (4, 2) and not set(labelled) & set(unlabelled)
        assert summary["precision"] is None or 0 <= summary["precision"] <= 1
    for name, wiring in r.rounds.items():  # IntraDA stage 2: from the pretrained model, on the set
        assert wiring.init == PRETRAIN
        check_trained(p, name, tmp_path, pretrained, train(name))
        assert not torch.equal(load_model(model_path(name)).state_dict()["backbone.conv1.weight"],
                               load_model(model_path(r.pseudo[wiring.pseudo])).state_dict()["backbone.conv1.weight"])
    for name, wiring in r.ensembles.items():
        meta = ensemble_run(p, RunSpec(name, 0), members=[model_path(m) for m in wiring.members],
                            out_dir=model_path(name).parent)
        assert (meta["members"], meta["weights"]) == (["advent", "minent"], [0.5, 0.5])
        ens = load_model(model_path(name)).eval()
        assert isinstance(ens, Ensemble) and ens.align_corners is True
        x = torch.randn(1, 3, 24, 48)
        with torch.no_grad():
            parts = [load_model(model_path(m)).eval()(x)["logits"] for m in wiring.members]
            torch.testing.assert_close(ens(x)["logits"], 0.5 * parts[0] + 0.5 * parts[1])

    evaluated = [v for v in r.evaluate if v != r.oracle]  # the oracle: the benchmark's, proven by test_profiles
    assert evaluated == [v for v in RUNS[method]["evaluate"] if v != "oracle"]
    for name in evaluated:
        m = evaluate_run(p, RunSpec(name, 0), model_path=model_path(name), out_dir=tmp_path / "eval" / name / "s0",
                         metrics_path=tmp_path / "metrics" / name / "s0.json", **common)
        check_metrics(p, bench, name, m, tmp_path)
