"""The self-training family's recipes (profiles/self_training.yaml under cbst, crst or tpld, on a benchmark profile):
merged, they carry the released CRST code's setup (its CBST is the same run without the model regulariser), and
each runs end to end at tiny sizes on fixtures in the real layouts, on a target subset given as a list file in the
released code's format, with the pipeline's own functions wired as the stages wire them: the source-only
pretraining, then per round its pseudo-label set (from the previous model) and its training, then the evaluation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from test_profiles import PROFILES, REPO, SOURCE, TINY_MODEL, write_params
from test_recipes import stacked, wired, write_fixtures

from plca.config import ConfigError
from plca.data.datasets import CityscapesReader
from plca.experiment import (
    PRETRAIN,
    RunSpec,
    evaluate_run,
    load_model,
    make_reader,
    pseudo_label_run,
    spatial_prior_run,
)
from plca.labelling import read_names
from plca.params import Params, validate_params
from plca.profiles import Merged

PROFILE_DIR = REPO / "profiles"
#: Each recipe's sets (the model that labels each) and rounds (the model each starts from, its set), in order.
RUNS: dict[str, dict[str, Any]] = {
    "cbst": {"pseudo": {"cbst_p1": "pretrain", "cbst_p2": "cbst_r1", "cbst_p3": "cbst_r2"},
             "rounds": {"cbst_r1": ("pretrain", "cbst_p1"), "cbst_r2": ("cbst_r1", "cbst_p2"),
                        "cbst": ("cbst_r2", "cbst_p3")}},
    "crst": {"pseudo": {"cbst_p1": "pretrain", "crst_p2": "crst_r1", "crst_p3": "crst_r2"},
             "rounds": {"crst_r1": ("pretrain", "cbst_p1"), "crst_r2": ("crst_r1", "crst_p2"),
                        "crst": ("crst_r2", "crst_p3")}},
    "cbst_sp": {"pseudo": {"cbst_sp_p1": "pretrain", "cbst_sp_p2": "cbst_sp_r1", "cbst_sp_p3": "cbst_sp_r2"},
                "rounds": {"cbst_sp_r1": ("pretrain", "cbst_sp_p1"), "cbst_sp_r2": ("cbst_sp_r1", "cbst_sp_p2"),
                           "cbst_sp": ("cbst_sp_r2", "cbst_sp_p3")}},
    "crst_lrent": {"pseudo": {"crst_lrent_p1": "pretrain", "crst_lrent_p2": "crst_lrent_r1",
                              "crst_lrent_p3": "crst_lrent_r2"},
                   "rounds": {"crst_lrent_r1": ("pretrain", "crst_lrent_p1"),
                              "crst_lrent_r2": ("crst_lrent_r1", "crst_lrent_p2"),
                              "crst_lrent": ("crst_lrent_r2", "crst_lrent_p3")}},
    "crst_mrkld_lrent": {"pseudo": {"crst_lrent_p1": "pretrain", "crst_mrkld_lrent_p2": "crst_mrkld_lrent_r1",
                                    "crst_mrkld_lrent_p3": "crst_mrkld_lrent_r2"},
                         "rounds": {"crst_mrkld_lrent_r1": ("pretrain", "crst_lrent_p1"),
                                    "crst_mrkld_lrent_r2": ("crst_mrkld_lrent_r1", "crst_mrkld_lrent_p2"),
                                    "crst_mrkld_lrent": ("crst_mrkld_lrent_r2", "crst_mrkld_lrent_p3")}},
    "tpld": {"pseudo": {"tpld_p1": "pretrain", "tpld_p2": "tpld_r1", "tpld_p3": "tpld_r2"},
             "rounds": {"tpld_r1": ("pretrain", "tpld_p1"), "tpld_r2": ("tpld_r1", "tpld_p2"),
                        "tpld": ("tpld_r2", "tpld_p3")}},
}
#: Each recipe's set policies and the options beyond the class-balanced ones (TPLD: voting, then easy/hard).
POLICIES = {"cbst": ["class_balanced"] * 3, "cbst_sp": ["class_balanced"] * 3, "crst": ["class_balanced"] * 3,
            "crst_lrent": ["class_balanced"] * 3, "crst_mrkld_lrent": ["class_balanced"] * 3,
            "tpld": ["class_balanced_vote", "class_balanced_vote", "easy_hard"]}
EXTRA = {"class_balanced": {}, "class_balanced_vote": {"window": 3, "alpha": 0.7, "iterations": 3},
         "easy_hard": {"q": 0.3, "gamma": 2.0}}
PORTIONS = [0.2, 0.25, 0.3]  # the released code: 0.2, + 0.05 a round
LR = 5e-5
#: The method each recipe's rounds train (CBST-SP: CBST's, on other pseudo-labels).
METHOD = {"cbst_sp": "cbst", "crst_lrent": "crst", "crst_mrkld_lrent": "crst"}
#: The recipes' model regulariser (regularizer, weight, code image weights): CRST's MRKLD unless named here.
REGULARISER = {"cbst": ("none", 0.0, True), "cbst_sp": ("none", 0.0, True), "crst_lrent": ("none", 0.0, True)}
#: Options of a recipe's sets beyond the policy's (LRENT's soft labels: alpha = lr_weight_ent 0.25).
SET_OPTIONS = {"crst_lrent": {"lrent": 0.25}, "crst_mrkld_lrent": {"lrent": 0.25}}
CASES = [("gta5", "cbst"), ("gta5", "cbst_sp"), ("gta5", "cbst_mxnet"), ("gta5", "crst"), ("synthia", "crst"),
         ("gta5", "crst_lrent"), ("gta5", "crst_mrkld_lrent"), ("gta5", "tpld")]
#: CBST on its own release's schedule (profiles/cbst_mxnet.yaml): five rounds, each's set and learning rate.
CBST_MXNET_ROUNDS = {"cbst_r1": ("pretrain", "cbst_p1"), "cbst_r2": ("cbst_r1", "cbst_p2"),
                     "cbst_r3": ("cbst_r2", "cbst_p3"), "cbst_r4": ("cbst_r3", "cbst_p4"),
                     "cbst": ("cbst_r4", "cbst_p5")}
N_TARGET_TRAIN, LISTED = 6, 4  # the list file keeps 4 of the 6 target train images
TINY_CROP, TINY_EVAL = [32, 48], [48, 24]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from more


def recipe(bench: str, method: str) -> Merged:
    """What `python -m plca.profile <bench> self_training <method>` writes."""
    return stacked(bench, "self_training", method)


@pytest.mark.parametrize("bench", sorted(PROFILES))
@pytest.mark.parametrize("method", sorted(RUNS))
def test_recipe_carries_the_released_setup(bench: str, method: str) -> None:
    p = recipe(bench, method).params
    assert p.profile == f"{bench}+self_training+{method}"
    # 1 source + 1 target image a step; BatchNorm frozen (eval mode, affine not optimised)
    assert (p.engine.batch_size, p.engine.grad_accum) == (1, 1)
    assert (p.model.depth, p.model.norm, p.model.bn_mode) == (101, "batch", "frozen")
    # the rounds: SGD 5e-5, classifier 10x, momentum 0.9, weight decay 5e-4, constant; 3 rounds of 2 x 505 steps
    o = p.adapt.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.poly_power, o.head_lr_mult) == ("sgd", LR, 0.9, 5e-4, 0.0, 10.0)
    assert p.adapt.steps == 3030
    r = p.runs
    assert [p.steps(name) for name in r.rounds] == [1010] * 3
    assert {k: (w.init, w.pseudo) for k, w in r.rounds.items()} == RUNS[method]["rounds"]
    assert r.pseudo == RUNS[method]["pseudo"]
    assert (r.train_source, r.adapt, r.evaluate, r.oracle) == ([], [], [method, "oracle"], "oracle")
    assert {p.variant(v).train.method for v in r.rounds} == {METHOD.get(method, method)}
    cfg = p.method_config(method)
    assert (cfg.regularizer, cfg.weight, cfg.code_image_weights) == REGULARISER.get(method, ("kld", 0.1, True))
    # CBST-SP's sets apply the source's spatial prior, counted at 512x256 (70 / 2048 of the width: sigma 2.92)
    assert [p.pseudo[s].spatial_prior for s in r.pseudo] == [method == "cbst_sp"] * 3
    assert p.spatial_prior.size == (512, 256) and p.spatial_prior.sigma == pytest.approx(0.0342 * 512 / 6)
    if method == "tpld":  # two rounds of phase 1, one of phase 2 on the easy (labelled) and hard images
        assert [(p.method_config(v).phase, p.variant(v).train.labelled) for v in r.rounds] == [
            (1, "source"), (1, "source"), (2, "pseudo")]
    # each round's set: class-balanced at 0.2, 0.25, 0.3 from every 4th pixel, predicted at 0.9 x 2048x1024 and
    # mirrored
    for name, portion, policy in zip(r.pseudo, PORTIONS, POLICIES[method], strict=True):
        s = p.pseudo[name]
        assert (s.policy, s.options, s.input_size, s.flip) == (
            policy, {"portion": portion, "ds_rate": 4, "policy": "cb", **EXTRA[policy], **SET_OPTIONS.get(method, {})},
            (1843, 922), True), name
    # scale 0.5-1.5 and 512x1024 crops with flips on both domains; full-resolution evaluation
    src, tgt = p.transform("source"), p.transform("target")
    assert (src.short_edge, src.crop, src.flip) == ((526, 1578), (512, 1024), True)
    assert (tgt.short_edge, tgt.crop, tgt.flip) == ((512, 1536), (512, 1024), True)
    assert p.data.eval_size == (2048, 1024) and p.data.target.train_ids is None
    # the source-only model the rounds start from (ours: the code supplies one)
    assert (p.pretrain.steps, p.pretrain.optim.lr, p.pretrain.optim.head_lr_mult) == (120000, 2.5e-4, 10.0)
    assert (p.oracle.steps, p.oracle.optim.lr, p.oracle.optim.poly_power) == (3030, LR, 0.0)
    assert p.data.protocol == (19 if bench == "gta5" else 16)
    assert (p.data.source.format, p.data.target.format) == (SOURCE[bench], "cityscapes")


@pytest.mark.parametrize("bench", sorted(PROFILES))
def test_the_cbst_release_recipe_carries_its_own_schedule(bench: str) -> None:
    p = recipe(bench, "cbst_mxnet").params
    r = p.runs
    assert {k: (w.init, w.pseudo) for k, w in r.rounds.items()} == CBST_MXNET_ROUNDS
    assert r.pseudo == {s: init for init, s in CBST_MXNET_ROUNDS.values()}  # each set labelled by its round's start
    assert (r.train_source, r.adapt, r.evaluate) == ([], [], ["cbst", "oracle"])
    # 5 rounds of 2 x 2,975 steps; 1e-4, divided by sqrt(2) a round, constant within one
    assert p.adapt.steps == 29750 and [p.steps(v) for v in r.rounds] == [5950] * 5
    lrs = [p.phase(v).optim.lr for v in r.rounds]
    np.testing.assert_allclose(lrs, [1e-4 / math.sqrt(2) ** k for k in range(5)], rtol=1e-12)
    assert {(p.phase(v).optim.poly_power, p.phase(v).optim.head_lr_mult) for v in r.rounds} == {(0.0, 10.0)}
    assert {p.variant(v).train.method for v in r.rounds} == {"cbst"}
    assert p.method_config("cbst").regularizer == "none"
    # portions 0.15 + 0.05 a round, the placeholder zero of the MXNet code's lists, 1850x925 predictions mirrored
    for s, portion in zip(r.pseudo, [0.15, 0.2, 0.25, 0.3, 0.35], strict=True):
        ps = p.pseudo[s]
        assert (ps.policy, ps.options, ps.input_size, ps.flip, ps.spatial_prior) == (
            "class_balanced", {"portion": portion, "ds_rate": 4, "policy": "cb", "cbst_mxnet": True}, (1850, 925),
            True, False), s
    # scale 0.7-1.3 of GTA5's 1052 and Cityscapes' 1024 short edges, 500x500 crops
    src, tgt = p.transform("source"), p.transform("target")
    assert (src.short_edge, src.crop, tgt.short_edge, tgt.crop) == ((736, 1368), (500, 500), (717, 1331), (500, 500))
    assert (p.oracle.steps, p.oracle.optim.lr) == (29750, 1e-4)
    raw = copy.deepcopy(recipe(bench, "cbst_mxnet").raw)
    raw["variants"]["cbst"]["train"]["lr_scale"] = 0.0
    with pytest.raises(ConfigError, match=r"variants.cbst.train.*lr_scale must be > 0, got 0.0"):
        validate_params(raw, "test")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return write_fixtures(tmp_path_factory)  # the adversarial recipes' data: 6 target train images


def tiny_recipe(bench: str, method: str, root: Path, weights: Path, tmp: Path) -> tuple[Params, list[str]]:
    """The merged recipe with its sizes made tiny, on a list file (the released code's format) of 4 of the 6
    target train images; returns the params and the listed names."""
    raw = recipe(bench, method).raw
    names = CityscapesReader(root / "cityscapes", "train").names
    listed = names[1:1 + LISTED]
    ids = tmp / "train_ClsConfSet.lst"
    ids.write_text("".join(f"leftImg8bit/train/{n.split('_')[0]}/{n}_leftImg8bit.png\t"
                           f"gtFine/train/{n.split('_')[0]}/{n}_gtFine_labelIds.png\n" for n in listed))
    d = raw["data"]
    d["root"] = str(root)
    d["source"]["root"] = str(root / SOURCE[bench])
    d["target"].update(root=str(root / "cityscapes"), train_ids=str(ids))
    d["eval_size"] = TINY_EVAL
    for t in ("train_transform", "target_transform"):
        d[t].update(short_edge=[32, 40], crop=TINY_CROP)
    raw["model"].update(TINY_MODEL, pretrained=str(weights))
    raw["engine"].update(num_workers=0, log_every=1, checkpoint_every=1, device="cpu", threads=1)
    raw["pretrain"]["steps"] = 2
    raw["adapt"]["steps"], raw["oracle"]["steps"] = 2 * len(raw["runs"]["rounds"]), 2  # 2 steps a round
    for s in raw["pseudo"].values():
        if s.get("input_size") is not None:
            s["input_size"] = TINY_EVAL
    raw["evaluate"]["batch_size"] = 2
    raw["tracking"]["enabled"] = False
    return write_params(raw, tmp / "params.yaml"), listed


@pytest.mark.parametrize(("bench", "method"), CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_recipe_self_trains_on_the_listed_images_and_evaluates_end_to_end(
        bench: str, method: str, tmp_path: Path, fixtures: dict[str, tuple[Path, Path]]) -> None:
    p, listed = tiny_recipe(bench, method, *fixtures[bench], tmp_path)
    r = p.runs
    common = dict(tracking=p.tracking, tags={"profile": p.profile}, progress=False)
    model_path, train = wired(p, tmp_path)

    assert train(PRETRAIN)["steps"] == 2
    prior = tmp_path / "priors" / "spatial.npy"
    if any(p.pseudo[s].spatial_prior for s in r.pseudo):  # the spatial_prior stage: the source labels counted
        info = spatial_prior_run(p, prior, progress=False)
        assert info["images"] == len(make_reader(p.data.source, "train")) > 0
        q = np.load(prior)
        assert q.shape == (p.model.num_classes, 256, 512)
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    made: set[str] = set()
    for name, wiring in r.rounds.items():  # each round after the set its start model labels
        if wiring.pseudo not in made:
            out = tmp_path / "pseudo" / wiring.pseudo / "s0"
            summary = pseudo_label_run(p, wiring.pseudo, 0, model_path=model_path(r.pseudo[wiring.pseudo]),
                                       out_dir=out, prior_path=prior, **common)
            assert summary.get("spatial_prior", False) == p.pseudo[wiring.pseudo].spatial_prior
            # only the listed images are predicted, labelled or not
            assert summary["images"] == LISTED
            labelled, unlabelled = read_names(out, "labelled"), read_names(out, "unlabelled")
            assert sorted(labelled + unlabelled) == listed
            assert sorted(f.stem for f in (out / "labels").glob("*.png")) == sorted(labelled)
            if p.pseudo[wiring.pseudo].options.get("lrent"):  # LRENT's soft labels beside the PNGs
                assert sorted(f.stem for f in (out / "soft").glob("*.npz")) == sorted(labelled)
            assert summary["options"]["portion"] == p.pseudo[wiring.pseudo].options["portion"]
            made.add(wiring.pseudo)
        start = load_model(model_path(wiring.init)).state_dict()
        assert train(name)["steps"] == 2
        state = load_model(model_path(name)).state_dict()
        assert not torch.equal(state["backbone.conv1.weight"], start["backbone.conv1.weight"]), name
        # BatchNorm frozen: affine and running statistics as the round's start model left them
        for key in ("backbone.bn1.weight", "backbone.bn1.bias", "backbone.bn1.running_mean",
                    "backbone.layer3.0.bn2.running_var"):
            torch.testing.assert_close(state[key], start[key], rtol=0, atol=0, msg=f"{name}: {key}")
        log = pd.read_csv(tmp_path / "logs" / name / "s0.csv")
        assert list(log["step"]) == [1, 2]
        lr = p.phase(name).optim.lr  # constant within a round (POWER 0); CBST's release: / sqrt(2) a round
        np.testing.assert_allclose(log["lr"], [lr, lr], rtol=1e-12)
        assert lr == pytest.approx(LR if method != "cbst_mxnet" else 1e-4 / 2 ** (list(r.rounds).index(name) / 2))
        assert np.isfinite(log["st_loss"]).all()
    assert made == set(r.pseudo)
    row = r.evaluate[0]  # the recipe's row (CBST's release: cbst)
    m = evaluate_run(p, RunSpec(row, 0), model_path=model_path(row), out_dir=tmp_path / "eval" / row / "s0",
                     metrics_path=tmp_path / "metrics" / row / "s0.json", **common)
    assert json.loads((tmp_path / "metrics" / row / "s0.json").read_text()) == m
    assert m["variant"] == row and 0 <= m["miou"] <= 100
    assert m["miou"] == (m["miou19"] if bench == "gta5" else m["miou16"])


#: PLCA + CRST on a benchmark (profiles/plca_crst.yaml): the wiring of its sets and rounds.
PLCA_CRST_ROUNDS = {"plca_crst_r1": ("plca", "plca_crst_p1"), "plca_crst_r2": ("plca_crst_r1", "plca_crst_p2"),
                    "plca_crst": ("plca_crst_r2", "plca_crst_p3")}


@pytest.mark.parametrize("bench", sorted(PROFILES))
def test_the_plca_crst_recipe_trains_plca_then_crst_rounds_with_their_own_phase(bench: str) -> None:
    p = stacked(bench, "plca_crst").params
    r = p.runs
    assert {k: (w.init, w.pseudo) for k, w in r.rounds.items()} == PLCA_CRST_ROUNDS
    assert r.pseudo == {s: init for init, s in PLCA_CRST_ROUNDS.values()}
    assert (r.adapt, r.evaluate) == (["plca"], ["plca", "plca_crst", "oracle"])
    # PLCA keeps the benchmark's recipe; the rounds CRST's optimiser, 2 epochs of 2,975 images at 8 a step each
    bench_adapt = stacked(bench).params.adapt
    assert p.phase("plca") == bench_adapt and p.steps("plca") == bench_adapt.steps
    for v in r.rounds:
        o = p.phase(v).optim
        assert p.steps(v) == 744 and p.variant(v).train.method == "crst"
        assert (o.name, o.lr, o.momentum, o.weight_decay, o.poly_power, o.head_lr_mult) == (
            "sgd", LR, 0.9, 5e-4, 0.0, 10.0), v
    cfg = p.method_config("plca_crst")
    assert (cfg.regularizer, cfg.weight, cfg.code_image_weights) == ("kld", 0.1, True)
    for s, portion in zip(r.pseudo, PORTIONS, strict=True):
        ps = p.pseudo[s]
        assert (ps.policy, ps.options["portion"], ps.input_size, ps.flip) == (
            "class_balanced", portion, (1843, 922), True), s
    # one augmentation for the whole run: PLCA's
    assert p.data.train_transform == stacked(bench).params.data.train_transform


def test_plca_crst_runs_end_to_end_at_tiny_size(tmp_path: Path, fixtures: dict[str, tuple[Path, Path]]) -> None:
    root, weights = fixtures["gta5"]
    raw = copy.deepcopy(stacked("gta5", "plca_crst").raw)
    d = raw["data"]
    d["root"], d["eval_size"] = str(root), TINY_EVAL
    d["source"]["root"], d["target"]["root"] = str(root / SOURCE["gta5"]), str(root / "cityscapes")
    d["train_transform"].update(short_edge=[32, 40], crop=TINY_CROP)
    raw["model"].update(TINY_MODEL, pretrained=str(weights))
    raw["engine"].update(num_workers=0, log_every=1, checkpoint_every=1, device="cpu", threads=1, batch_size=1)
    raw["pretrain"]["steps"], raw["adapt"]["steps"] = 2, 2
    for v in PLCA_CRST_ROUNDS:
        raw["variants"][v]["train"]["phase"]["steps"] = 6  # 2 steps a round
    for s in raw["pseudo"].values():
        if s.get("input_size") is not None:
            s["input_size"] = TINY_EVAL
    raw["evaluate"]["batch_size"] = 2
    raw["tracking"]["enabled"] = False
    p = write_params(raw, tmp_path / "params.yaml")
    common = dict(tracking=p.tracking, tags={"profile": p.profile}, progress=False)
    model_path, train = wired(p, tmp_path)
    assert train(PRETRAIN)["steps"] == 2
    assert train("plca")["steps"] == 2
    for name, (init, pseudo) in PLCA_CRST_ROUNDS.items():
        out = tmp_path / "pseudo" / pseudo / "s0"
        summary = pseudo_label_run(p, pseudo, 0, model_path=model_path(init), out_dir=out, **common)
        assert summary["labelled"] == summary["images"] > 0
        assert train(name)["steps"] == 2
        log = pd.read_csv(tmp_path / "logs" / name / "s0.csv")
        np.testing.assert_allclose(log["lr"], [LR, LR], rtol=1e-12)  # CRST's constant lr, not PLCA's poly
    m = evaluate_run(p, RunSpec("plca_crst", 0), model_path=model_path("plca_crst"),
                     out_dir=tmp_path / "eval" / "plca_crst" / "s0",
                     metrics_path=tmp_path / "metrics" / "plca_crst" / "s0.json", **common)
    assert m["variant"] == "plca_crst" and 0 <= m["miou"] <= 100
