"""The paper profiles (the overlays profiles/gta5.yaml, profiles/synthia.yaml on profiles/default.yaml): the overlay
rules and the command that selects them (python -m plca.profile); merged, they carry the released code's setup,
stop at once without ImageNet weights, train and evaluate end to end at tiny sizes on fixtures in the real
layouts, and their prepare stage downloads, verifies and pre-resizes the real datasets (loopback server)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from fixture_archives import cityscapes_archives, fake_unrar, gta5_archives, sha256, synthia_archive, write_sources
from loopback import Behaviour, LoopbackServer, closed_port_url
from real_formats import write_cityscapes, write_gta5, write_synthia

from plca.config import ConfigError, from_dict, load_yaml
from plca.data.extract import is_complete
from plca.data.labels import IGNORE_INDEX, cityscapes_ids_to_train_ids
from plca.data.prepare import RECORD, RealDataConfig, check_domain_roots
from plca.experiment import PRETRAIN, RunSpec, evaluate_run, load_model, make_reader, train_run
from plca.models.resnet import ResNet
from plca.params import Params, load_params
from plca.profile import build, changed_variants, main
from plca.profiles import Merged, Overlay, compose

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "profiles" / "default.yaml"
PROFILES = {"gta5": REPO / "profiles" / "gta5.yaml", "synthia": REPO / "profiles" / "synthia.yaml"}
SOURCE = {"gta5": "gta5", "synthia": "synthia"}
USER, PASSWORD = "bob@example.org", "Pr0file-s3cret"
# The tiny model every end-to-end run uses (ImageNet weights exist only for width 1, so the test writes its own).
TINY_MODEL = {"depth": 18, "width": 0.125, "aspp_rates": [1, 2]}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from more


def merged(name: str) -> Merged:
    """The default with profiles/<name>.yaml merged on: what `python -m plca.profile <name>` writes."""
    return compose(load_yaml(DEFAULT), [Overlay(name, PROFILES[name], load_yaml(PROFILES[name]))], DEFAULT)


def raw_profile(name: str) -> dict[str, Any]:
    return merged(name).raw


def write_params(raw: dict[str, Any], path: Path) -> Params:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


# ------------------------------------------------------------------------------------------------ the files


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_has_the_released_codes_setup(name: str) -> None:
    p = merged(name).params
    assert p.profile == name
    gta5 = name == "gta5"
    assert (p.data.protocol, p.adapt.steps, p.adapt.optim.poly_horizon) == ((19, 10416, 11160) if gta5
                                                                             else (16, 2976, 3720))
    assert p.adapt.steps == (28 if gta5 else 8) * 372 and p.adapt.optim.poly_horizon == (30 if gta5 else 10) * 372
    assert ("GTA5" if gta5 else "SYNTHIA") in p.data.label and "Cityscapes" in p.data.label
    m = p.model
    assert (m.depth, m.width, m.norm, m.aspp_rates, m.num_classes) == (101, 1.0, "batch", (6, 12, 18, 24), 19)
    assert m.pretrained == Path("weights/resnet101-imagenet.pth")
    assert p.engine.batch_size * p.engine.grad_accum == 8  # 8 source + 8 target images per step
    o = p.adapt.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.poly_power, o.head_lr_mult) == ("sgd", 2.5e-4, 0.9, 5e-4,
                                                                                        0.9, 1.0)
    assert p.oracle.steps == p.adapt.steps and p.pretrain.steps == 0
    t = p.data.train_transform
    assert (t.short_edge, t.crop, t.flip, t.channel_order) == ((760, 988), (730, 730), True, "rgb")
    assert p.data.eval_size == (1460, 730)
    assert p.methods["plca"] == {"w_lov": 0.75, "w_ass": 0.1, "w_lsr": 0.01, "alpha": 0.5, "tau": 10.0}
    assert p.seeds == [0] and "plca" in p.runs.adapt and p.variant("plca").train.test_time_aggregation
    assert p.test_time_alpha("plca") == 0.5  # the alpha PLCA trains with (Sec. 3.5)
    # Table 2's two rows and the oracle (the default's runs.oracle); every report role that runs is one of them
    assert (p.runs.train_source, p.runs.adapt, p.runs.oracle, p.runs.evaluate) == (
        ["source_only"], ["plca"], "oracle", ["source_only", "plca", "oracle"])
    assert (p.report.baseline, p.report.headline, p.report.class_iou) == ("source_only", "plca",
                                                                          ["source_only", "plca", "oracle"])
    # real data only: every item of the source, Cityscapes splits, each domain a prepared dataset in data.root
    assert p.data.embedded is None and p.data.prepare is not None
    assert p.data.prepare.datasets == [SOURCE[name], "cityscapes"]
    assert (p.data.source.format, p.data.source.train, p.data.source.val) == (SOURCE[name], None, None)
    assert (p.data.target.format, p.data.target.train, p.data.target.val) == ("cityscapes", "train", "val")
    check_domain_roots(p.data.root, p.data.prepare, [p.data.source.root, p.data.target.root])
    assert p.data.prepare.full_size == {"cityscapes": ["val"]}  # evaluation on the 2048x1024 labels
    # what the overlay leaves to the default must still be the released code's setup
    assert (t.mean, t.std, t.scale) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1)
    assert (p.engine.batch_size, p.engine.grad_accum, p.engine.amp) == (4, 2, False)
    assert p.oracle.optim == p.adapt.optim and p.pretrain.options == {"lovasz": True}
    po = p.pretrain.optim
    assert (po.name, po.lr, po.momentum, po.weight_decay, po.head_lr_mult) == ("sgd", 2.5e-4, 0.9, 5e-4, 1.0)
    assert p.methods["source_only"] == {"w_lov": 0.75} and p.variant("source_only").train.options == {"lovasz": True}


def _leaves(overlay: dict[str, Any], base: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, overlay value, base value) of every value an overlay replaces."""
    out = []
    for k, v in overlay.items():
        b = base.get(k, ...) if isinstance(base, dict) else ...
        if isinstance(v, dict) and isinstance(b, dict):
            out += _leaves(v, b, f"{path}{k}.")
        else:
            out.append((f"{path}{k}", v, b))
    return out


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_overlay_holds_only_what_differs_from_the_default(name: str) -> None:
    default, overlay = load_yaml(DEFAULT), load_yaml(PROFILES[name])
    same = [key for key, v, b in _leaves(overlay, default) if v == b]
    assert not same, f"{PROFILES[name]} repeats the default at {same}"
    # methods' shared options, variant definitions and the report's roles are the default's (a recipe overlay's
    # business, not a benchmark's)
    assert not {"methods", "variants", "report", "tracking", "profile"} & set(overlay)


def write_overlay(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def overlay(path: Path) -> Overlay:
    return Overlay(path.stem, path, load_yaml(path))


def test_an_overlay_key_the_default_lacks_is_an_error_naming_the_file_and_the_key(tmp_path: Path) -> None:
    base = load_yaml(DEFAULT)
    new_variant = {"train": {"method": "plca"}, "shw": {"label": "x", "tables": []}}  # a new variant: checked too
    for values, key in (({"adapt": {"optim": {"lrr": 0.1}}}, "adapt.optim.lrr"), ({"modle": {"depth": 50}}, "modle"),
                        ({"data": {"source": {"rot": "x"}}}, "data.source.rot"),
                        ({"variants": {"plca": {"train": {"optoins": {}}}}}, "variants.plca.train.optoins"),
                        ({"variants": {"mine": new_variant}}, "variants.mine.shw"),
                        ({"runs": {"adpat": ["plca"]}}, "runs.adpat"), ({"plca": {"tau": 5.0}}, "plca")):
        bad = overlay(write_overlay(tmp_path / "typo.yaml", values))
        with pytest.raises(ConfigError) as err:
            compose(base, [bad], DEFAULT)
        assert str(err.value).startswith(f"{tmp_path / 'typo.yaml'}: unknown key '{key}'")
    # the command records the profile itself
    with pytest.raises(ConfigError, match=r"recipe.yaml: 'profile' is not an overlay's to set"):
        compose(base, [overlay(write_overlay(tmp_path / "recipe.yaml", {"profile": "mine"}))], DEFAULT)


def test_free_form_mappings_and_declared_settings_take_new_keys(tmp_path: Path) -> None:
    default = load_yaml(DEFAULT)
    assert "options" not in default["variants"]["plca"]["train"]  # declared by the schema, absent in the default
    del default["methods"]["minent"]  # a base without MinEnt's shared options
    recipe = write_overlay(tmp_path / "tau.yaml", {
        "variants": {"plca": {"train": {"options": {"tau": 5.0}}},  # a setting of TrainSpec the default leaves out
                     "plca_alpha": {"train": {"method": "plca", "test_time_aggregation": True,  # a new variant
                                              "options": {"alpha": 0.25}},
                                    "show": {"label": "PLCA (alpha 0.25)", "tables": ["table1"]}}},
        "methods": {"plca": {"cass": True},  # a method option the default's shared options do not set
                    "minent": {"lovasz": False}},  # shared options for a method the default has none for
        "pretrain": {"options": {"w_lov": 0.5}},  # a method option the default's pretrain does not set
    })
    p = compose(default, [overlay(recipe)], DEFAULT).params
    assert p.method_options("plca")["tau"] == 5.0 and p.method_options("fass")["tau"] == 10.0
    assert p.method_options("fass")["cass"] is False and p.method_options("plca")["cass"] is True  # own options win
    assert p.method_options("minent") == {"lovasz": False}
    assert p.variant("plca_alpha").train.options == {"alpha": 0.25} and p.test_time_alpha("plca_alpha") == 0.25
    assert p.variant("plca_alpha").show.label == "PLCA (alpha 0.25)"
    assert p.pretrain.options == {"lovasz": False, "w_lov": 0.5}  # merged key by key
    assert p.profile == "tau"
    # free-form at the merge, checked at validation: an unknown method, an option no method has
    for values, message in (({"methods": {"nope": {}}}, "params.methods.nope: unknown method"),
                            ({"methods": {"plca": {"taw": 1.0}}}, "params.methods.plca + params.variants.")):
        with pytest.raises(ConfigError, match=rf"^\S*bad.yaml: {re.escape(message)}"):
            compose(default, [overlay(write_overlay(tmp_path / "bad.yaml", values))], DEFAULT)


def test_overlays_compose_in_order_later_ones_win(tmp_path: Path) -> None:
    a = overlay(write_overlay(tmp_path / "a.yaml", {"seeds": [5, 6], "adapt": {"steps": 12}}))
    b = overlay(write_overlay(tmp_path / "b.yaml", {"seeds": [8], "adapt": {"optim": {"lr": 0.5}}}))
    base = load_yaml(DEFAULT)
    ab, ba = compose(base, [a, b], DEFAULT), compose(base, [b, a], DEFAULT)
    assert (ab.params.seeds, ab.params.profile) == ([8], "a+b")  # lists replace, never concatenate
    assert (ba.params.seeds, ba.params.profile) == ([5, 6], "b+a")
    for m in (ab, ba):  # keys only one overlay sets survive either order; the rest is the default's
        assert (m.params.adapt.steps, m.params.adapt.optim.lr, m.params.adapt.optim.momentum) == (12, 0.5, 0.9)
    assert base == load_yaml(DEFAULT)  # the base mapping is not modified


def test_a_recipe_overlay_on_top_of_a_benchmark_overlay(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_overlay(tmp_path / "plca-tau5.yaml", {
        "methods": {"plca": {"tau": 5.0}},
        "variants": {"plca_tau20": {"train": {"method": "plca", "test_time_aggregation": True,
                                              "options": {"tau": 20.0}},
                                    "show": {"label": "PLCA (tau 20)", "tables": ["table1", "table2"]}}},
        "runs": {"adapt": ["plca", "plca_tau20"], "evaluate": ["source_only", "plca", "plca_tau20", "oracle"]},
        "adapt": {"steps": 100},
    })
    out = tmp_path / "params.yaml"
    assert main(["gta5", str(recipe), "--params", str(out), "--base", str(DEFAULT)]) == 0
    p = load_params(out)
    assert p.profile == f"gta5+{tmp_path / 'plca-tau5.yaml'}"  # a path outside profiles/ is recorded as given
    assert capsys.readouterr().out.strip() == f"{out}: profile '{p.profile}'"
    # the benchmark's setup, the recipe's changes on top
    assert (p.model.depth, p.data.eval_size, p.adapt.optim.poly_horizon, p.seeds) == (101, (1460, 730), 11160, [0])
    assert p.adapt.steps == 100 and p.oracle.steps == 10416
    assert p.methods["plca"]["tau"] == 5.0 and p.method_options("plca_tau20")["tau"] == 20.0
    assert p.runs.adapt == ["plca", "plca_tau20"] and p.runs.train_source == ["source_only"]
    assert p.runs.oracle == "oracle" and p.all_variants == ["source_only", "plca", "plca_tau20", "oracle"]
    # the file says how it was made, and the same command rebuilds it byte for byte
    text = out.read_text()
    assert text.startswith(f"# GENERATED by `python -m plca.profile gta5 {recipe}`: {DEFAULT} + {PROFILES['gta5']}")
    assert build(["gta5", str(recipe)], DEFAULT)[0] == out.read_bytes()
    assert build([str(PROFILES["gta5"]), str(recipe)], DEFAULT)[0] == out.read_bytes()  # a path to profiles/gta5.yaml
    assert "eval_size: [1460, 730]" in text  # flow lists: reads like the hand-written files
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary file left behind


def test_a_validation_error_names_the_overlay_that_set_the_key(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    base = load_yaml(DEFAULT)
    gta5 = overlay(PROFILES["gta5"])
    bad = overlay(write_overlay(tmp_path / "bad.yaml", {"engine": {"batch_size": "four"}}))
    with pytest.raises(ConfigError) as err:
        compose(base, [gta5, bad], DEFAULT)
    msg = str(err.value)
    assert msg.startswith(f"{bad.path}: params.engine.batch_size: expected an integer, got 'four'")
    assert f"(merged: {DEFAULT} + {PROFILES['gta5']} + {bad.path})" in msg
    # a typo below a section an earlier overlay set: caught by the merge, with the full key
    typo = overlay(write_overlay(tmp_path / "typo.yaml", {"data": {"prepare": {"resize": {"short_egde": 900}}}}))
    with pytest.raises(ConfigError, match=r"^\S*typo.yaml: unknown key 'data.prepare.resize.short_egde'"):
        compose(base, [gta5, typo], DEFAULT)
    # and in a section the overlay sets whole (the default's data.prepare is null)
    with pytest.raises(ConfigError, match=r"^\S*typo.yaml: unknown key 'data.prepare.resize.short_egde'"):
        compose(base, [typo], DEFAULT)
    # a wrong value inside such a section: validation (here a section's own check) names the overlay
    twice = overlay(write_overlay(tmp_path / "twice.yaml", {"data": {"prepare": {"datasets": ["gta5", "gta5"]}}}))
    with pytest.raises(ConfigError, match=r"^\S*twice.yaml: data.prepare.datasets: expected distinct dataset names"):
        compose(base, [twice], DEFAULT)
    # a rule across keys: the overlay that set the key named and the later one that changed a key beside it
    table = overlay(write_overlay(tmp_path / "table.yaml", {"runs": {"adapt": ["fass"]}}))
    with pytest.raises(ConfigError) as err:
        compose(base, [gta5, table], DEFAULT)
    assert str(err.value).startswith(f"{PROFILES['gta5']}, {table.path}: params.runs.evaluate: 'plca' is neither "
                                     "trained nor assembled by runs")
    with pytest.raises(ConfigError) as err:  # the key named is the default's, the overlay set one beside it
        compose(base, [overlay(write_overlay(tmp_path / "t.yaml", {"runs": {"oracle": "fass"}}))], DEFAULT)
    assert str(err.value).startswith(f"{tmp_path / 't.yaml'}: params.runs: ['fass'] listed by more than one")
    # an undefined variant in runs: the overlay whose value is merged, not the earlier one (gta5) it replaced
    undefined = overlay(write_overlay(tmp_path / "undefined.yaml", {"runs": {
        "evaluate": ["source_only", "nope", "oracle"], "adapt": ["nope"]}}))
    with pytest.raises(ConfigError) as err:
        compose(base, [gta5, undefined], DEFAULT)
    assert str(err.value).startswith(f"{undefined.path}: params.runs.adapt: no variant 'nope'; defined: ")
    # a key no overlay set, nor one beside it: every file merged is named (here a base naming an undefined role)
    broken = copy.deepcopy(base)
    broken["report"]["baseline"] = "gone"
    steps = overlay(write_overlay(tmp_path / "steps.yaml", {"adapt": {"steps": 3}}))
    with pytest.raises(ConfigError) as err:
        compose(broken, [gta5, steps], DEFAULT)
    assert str(err.value).startswith(f"{DEFAULT} + {PROFILES['gta5']} + {steps.path}: params.report.baseline: no "
                                     f"variant 'gone'")

    # the command: exit 2, the message on stderr, params.yaml untouched
    out = tmp_path / "params.yaml"
    out.write_bytes(DEFAULT.read_bytes())
    assert main(["gta5", str(bad.path), "--params", str(out), "--base", str(DEFAULT)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad.path}: params.engine.batch_size: expected an integer")
    for argv, expected in ((["nogta"], "profiles/nogta.yaml: no such overlay file (overlays in "),
                           (["default", "gta5"], "'default' selects the default alone"),
                           (["gta5+synthia"], "without '+'"),
                           ([str(DEFAULT)], "is the default itself")):
        assert main([*argv, "--params", str(out), "--base", str(DEFAULT)]) == 2
        assert expected in capsys.readouterr().err
    assert out.read_bytes() == DEFAULT.read_bytes()


def test_returning_to_the_default_restores_params_yaml_byte_for_byte(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "params.yaml"
    out.write_bytes((REPO / "params.yaml").read_bytes())
    common = ["--params", str(out), "--base", str(DEFAULT)]
    assert main(["synthia", *common]) == 0
    assert load_params(out).profile == "synthia" and load_params(out).data.protocol == 16
    out.write_text(out.read_text().replace("seeds: [0]", "seeds: [0, 1]"))  # as `dvc exp run -S seeds=[0,1]`
    assert main(["gta5", *common]) == 0  # always from the default: nothing of synthia (nor the edit) stays
    assert "note: " in capsys.readouterr().err  # the replaced edit is pointed out
    assert yaml.safe_load(out.read_text()) == raw_profile("gta5")
    assert main(["default", *common]) == 0
    assert out.read_bytes() == DEFAULT.read_bytes()
    assert load_params(out).profile == "embedded" and load_params(out).data.embedded is not None


def test_params_yaml_is_rebuilt_from_the_default_by_its_profile() -> None:
    """params.yaml is never edited by hand: the default lives in profiles/default.yaml (one copy to edit)."""
    params = REPO / "params.yaml"
    profile = load_params(params).profile
    args = ["default"] if profile == load_yaml(DEFAULT)["profile"] else profile.split("+")
    assert build(args, DEFAULT)[0] == params.read_bytes(), (
        f"params.yaml is not what `python -m plca.profile {' '.join(args)}` writes: edit profiles/default.yaml (or "
        f"the overlay) instead and run that command")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_missing_imagenet_weights_stop_training_before_any_data_work(name: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    raw = raw_profile(name)  # the profile's own model section: ResNet-101, weights/resnet101-imagenet.pth
    for domain in ("source", "target"):
        raw["data"][domain]["root"] = str(tmp_path / "no-data" / domain)  # reading data would fail differently
    raw["tracking"]["enabled"] = False
    params = write_params(raw, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)  # the relative weights path resolves here, where there is none
    out = tmp_path / "models" / PRETRAIN / "s0"
    with pytest.raises(FileNotFoundError) as err:
        train_run(params, RunSpec(PRETRAIN, 0), out_dir=out, log_csv=tmp_path / "logs/pretrain/s0.csv",
                  checkpoint_dir=tmp_path / "ckpt", init_model=None, tracking=params.tracking, tags={},
                  progress=False)
    msg = str(err.value)
    assert str(tmp_path / "weights" / "resnet101-imagenet.pth") in msg
    assert "ResNet-101" in msg and "torchvision" in msg and "conv1.weight, bn1.weight, layer1.0.conv1.weight" in msg
    assert not out.exists() and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------------ end to end


def tiny_profile(name: str, tmp: Path) -> tuple[Params, Path]:
    """The profile with only its sizes made tiny; fixtures in the real layouts under tmp/prepared; tiny weights."""
    root = tmp / "prepared"
    source = SOURCE[name]
    if source == "gta5":
        write_gta5(root / "gta5", 4, size=(30, 50), seed=1)
    else:
        write_synthia(root / "synthia", 4, size=(30, 50), seed=1)
    write_cityscapes(root / "cityscapes", {"train": 4, "val": 2}, size=(32, 64), seed=2)

    # a torchvision-layout state_dict (fc.* included, as torchvision's files) of the tiny backbone
    torch.manual_seed(123)
    backbone = ResNet(TINY_MODEL["depth"], TINY_MODEL["width"], "batch")
    state = {k: v + 0.01 if k.endswith("bn1.weight") else v for k, v in backbone.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, backbone.out_channels), torch.zeros(1000)
    weights = tmp / "weights" / "tiny-imagenet.pth"
    weights.parent.mkdir()
    torch.save(state, weights)

    raw = raw_profile(name)
    d = raw["data"]
    d["root"] = str(root)
    d["source"]["root"] = str(root / source)
    d["target"]["root"] = str(root / "cityscapes")
    d["eval_size"] = [48, 24]
    d["train_transform"].update(short_edge=[32, 36], crop=[32, 48])
    raw["model"].update(TINY_MODEL, pretrained=str(weights))
    raw["engine"].update(batch_size=2, num_workers=0, log_every=1, checkpoint_every=1, device="cpu", threads=1)
    for phase in ("adapt", "oracle"):
        raw[phase]["steps"] = 2
        raw[phase]["optim"]["poly_horizon"] = 3  # still longer than the run, as the profile's
    raw["evaluate"]["batch_size"] = 2
    raw["tracking"]["enabled"] = False
    return write_params(raw, tmp / "params.yaml"), weights


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_two_iterations_of_the_profile_train_and_evaluate(name: str, tmp_path: Path) -> None:
    params, weights = tiny_profile(name, tmp_path)
    # everything but sizes is the profile's
    assert (params.pretrain.steps, params.engine.grad_accum, params.model.norm) == (0, 2, "batch")
    common = dict(tracking=params.tracking, tags={"profile": name}, progress=False)

    pre_dir = tmp_path / "models" / PRETRAIN / "s0"
    pre = train_run(params, RunSpec(PRETRAIN, 0), out_dir=pre_dir, log_csv=tmp_path / "logs/pretrain/s0.csv",
                    checkpoint_dir=tmp_path / "ckpt/pretrain", init_model=None, **common)
    assert pre["steps"] == 0
    # 0 steps: the "pretrained" model is the ImageNet-initialised one, and its stage still writes its log
    assert (tmp_path / "logs/pretrain/s0.csv").read_text().splitlines() == ["step,lr"]
    pretrained = load_model(pre_dir / "model.pt").state_dict()
    imagenet = torch.load(weights, weights_only=True)
    for key, value in imagenet.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(pretrained[f"backbone.{key}"], value, msg=key)

    plca_dir = tmp_path / "models" / "plca" / "s0"
    res = train_run(params, RunSpec("plca", 0), out_dir=plca_dir, log_csv=tmp_path / "logs/plca/s0.csv",
                    checkpoint_dir=tmp_path / "ckpt/plca", init_model=pre_dir / "model.pt", **common)
    assert res["steps"] == 2
    log = pd.read_csv(tmp_path / "logs/plca/s0.csv")
    assert list(log["step"]) == [1, 2] and {"fass", "cass"} <= set(log.columns)
    # the profile's SGD lr and poly schedule (power 0.9, horizon 3 here)
    np.testing.assert_allclose(log["lr"], [2.5e-4, 2.5e-4 * (1 - 1 / 3) ** 0.9], rtol=1e-6)
    trained = load_model(plca_dir / "model.pt").state_dict()
    assert not torch.equal(trained["backbone.conv1.weight"], pretrained["backbone.conv1.weight"])

    metrics_path = tmp_path / "metrics/plca/s0.json"
    m = evaluate_run(params, RunSpec("plca", 0), model_path=plca_dir / "model.pt",
                     out_dir=tmp_path / "eval/plca/s0", metrics_path=metrics_path, **common)
    assert json.loads(metrics_path.read_text()) == m
    assert m["variant"] == "plca" and 0 <= m["miou"] <= 100
    if name == "gta5":
        assert m["miou"] == m["miou19"]
    else:  # SYNTHIA: mIoU over 16 classes is the headline, mIoU* over 13 is reported beside it
        assert m["miou"] == m["miou16"] and m["miou13"] is not None and 0 <= m["miou13"] <= 100
    assert m["source_val_miou"] is None  # neither GTA5 nor SYNTHIA has a val split
    assert m["miou_without_tta"] is not None  # PLCA is scored with and without test-time aggregation
    full = json.loads((tmp_path / "eval/plca/s0/metrics.json").read_text())
    assert full["test_time_aggregation"] is True
    # predictions are at the label size (2048x1024 in the real set; 32x64 here), not the 48x24 network input
    sample = next((tmp_path / "eval/plca/s0/samples").glob("*.png"))
    assert cv2.imread(str(sample), cv2.IMREAD_UNCHANGED).shape[:2] == (32, 64)


# ------------------------------------------------------------------------------------------------ prepare


def load_stage() -> Any:
    sys.path.insert(0, str(REPO / "stages"))
    spec = importlib.util.spec_from_file_location("prepare_stage", REPO / "stages" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def cs_files(zips: dict[str, bytes]) -> dict[str, bytes]:
    return {"/file-handling/?packageID=1": zips["gtFine_trainvaltest.zip"],
            "/file-handling/?packageID=3": zips["leftImg8bit_trainvaltest.zip"]}


def sources_for(public: LoopbackServer | None, cs_site: LoopbackServer | None, archives: tuple[dict[str, bytes], ...]
                ) -> dict[str, Any]:
    """A sources file like the packaged one: GTA5 and SYNTHIA on a public server, Cityscapes on a site with a
    login (each a loopback server, or a closed port when offline)."""
    import hashlib

    gta5, cs, syn = archives
    url = public.url if public is not None else closed_port_url
    cs_url = cs_site.url if cs_site is not None else closed_port_url
    (syn_name, syn_data), = syn.items()
    return {
        "gta5": {"layout": "gta5", "expected": {"all": 4},
                 "archives": [{"file": k, "url": url(f"/data/{k}"), "sha256": sha256(v)} for k, v in gta5.items()]},
        "cityscapes": {
            "layout": "cityscapes", "homepage": cs_url("/downloads/"), "expected": {"train": 2, "val": 1},
            "auth": {"kind": "cityscapes", "login_url": cs_url("/login/"), "netrc_host": "127.0.0.1",
                     "username_env": "CITYSCAPES_USERNAME", "password_env": "CITYSCAPES_PASSWORD"},
            "archives": [{"file": k, "url": cs_url(f"/file-handling/?packageID={i}"),
                          "md5": hashlib.md5(cs[k]).hexdigest()}
                         for k, i in (("gtFine_trainvaltest.zip", 1), ("leftImg8bit_trainvaltest.zip", 3))]},
        "synthia": {"layout": "synthia", "expected": {"all": 3},
                    "archives": [{"file": syn_name, "url": url(f"/{syn_name}"), "sha256": sha256(syn_data),
                                  "subdir": "RAND_CITYSCAPES"}]},
    }


def prepare_params(name: str, tmp: Path, sources: Path) -> dict[str, Any]:
    """The profile with the prepare section pointed at tmp and the loopback sources, tiny resize and counts."""
    raw = raw_profile(name)
    d = raw["data"]
    root = tmp / "prepared"
    d["root"] = str(root)
    d["source"]["root"] = str(root / SOURCE[name])
    d["target"]["root"] = str(root / "cityscapes")
    dl = d["prepare"]["download"]
    dl.update(out_dir=str(tmp / "raw"), sources=str(sources))
    dl["fetch"].update(archive_dir=str(tmp / "archives"), manual_dir=str(tmp / "manual"), retries=0)
    dl["verify"].update(workers=1)
    dl.setdefault("extract", {})["rar_tools"] = [str(fake_unrar(tmp / "bin"))]
    d["prepare"]["resize"].update(short_edge=6, workers=2)  # two worker processes, as on a real machine
    return raw


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, bytes]]:
    work = tmp_path_factory.mktemp("archives")
    return (gta5_archives(work, n=4, parts=2), cityscapes_archives(work, train=2, val=1, test=1),
            synthia_archive(work, n=3))


def test_prepare_stage_downloads_verifies_and_resizes_both_profiles(
    tmp_path: Path, archives: tuple[dict[str, bytes], ...], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
) -> None:
    gta5, cs, syn = archives
    stage = load_stage()
    monkeypatch.setenv("CITYSCAPES_USERNAME", USER)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc of the machine running the tests

    # GTA5 + Cityscapes over HTTP: GTA5's public archives, Cityscapes behind its login
    public = LoopbackServer(Behaviour(files={f"/data/{k}": v for k, v in gta5.items()}))
    site = LoopbackServer(Behaviour(files=cs_files(cs), login_user=USER, login_password=PASSWORD))
    with public, site, caplog.at_level(logging.DEBUG):
        sources = write_sources(tmp_path / "sources.yaml", sources_for(public, site, archives))
        params_file = tmp_path / "gta5.yaml"
        params_file.write_text(yaml.safe_dump(prepare_params("gta5", tmp_path, sources), sort_keys=False))
        assert stage.main(["--params", str(params_file), "--no-progress"]) == 0
    assert sorted(public.paths_requested()) == sorted(f"/data/{k}" for k in gta5)
    assert site.paths_requested()[:2] == ["/login/", "/login/"] and set(cs_files(cs)) <= set(site.paths_requested())
    out = capsys.readouterr()
    assert "gta5: " in out.out and "all: 4" in out.out and "train: 2, val: 1" in out.out
    root = tmp_path / "prepared"
    record = json.loads((root / RECORD).read_text())
    assert record["datasets"]["gta5"]["pairs"] == {"all": 4} and record["short_edge"] == 6
    assert record["datasets"]["cityscapes"]["pairs"] == {"train": 2, "val": 1}
    assert not list(tmp_path.glob(".prepared*")) and not list(root.glob(".*resizing"))
    assert is_complete(tmp_path / "raw/gta5") and is_complete(tmp_path / "raw/cityscapes")
    assert not list((tmp_path / "archives").iterdir())  # keep_archives: false
    assert not (root / "cityscapes/leftImg8bit/test").exists()  # only train and val are prepared

    # the readers read the prepared data: resized train images, Cityscapes val at its stored size
    params = load_params(params_file)
    src = make_reader(params.data.source, "train")
    assert len(src) == 4 and src.read(0).image.shape == (6, 10, 3) and src.read(0).label.shape == (6, 10)
    tgt = make_reader(params.data.target, "train", with_labels=False)
    assert len(tgt) == 2 and tgt.read(0).image.shape == (6, 12, 3)
    val = make_reader(params.data.target, "val")
    assert len(val) == 1
    sample = val.read(0)
    raw_label = cv2.imread(str(next((tmp_path / "raw/cityscapes/gtFine/val").rglob("*_labelIds.png"))),
                           cv2.IMREAD_UNCHANGED)
    assert sample.image.shape == (8, 16, 3)
    np.testing.assert_array_equal(sample.label, cityscapes_ids_to_train_ids(raw_label))
    assert (sample.label != IGNORE_INDEX).any()
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))
    for secret in (USER, PASSWORD):
        assert secret not in out.out + out.err + caplog.text + written + params_file.read_text()

    # SYNTHIA + Cityscapes, offline: SYNTHIA's archive from the manual folder, Cityscapes already downloaded
    (tmp_path / "manual").mkdir()
    (name, data), = syn.items()
    (tmp_path / "manual" / name).write_bytes(data)
    sources = write_sources(tmp_path / "sources-offline.yaml", sources_for(None, None, archives))
    monkeypatch.delenv("CITYSCAPES_PASSWORD")  # not needed: nothing is downloaded
    params_file = tmp_path / "synthia.yaml"
    params_file.write_text(yaml.safe_dump(prepare_params("synthia", tmp_path, sources), sort_keys=False))
    assert stage.main(["--params", str(params_file), "--no-progress"]) == 0
    assert (tmp_path / "manual" / name).read_bytes() == data  # a manual archive is never deleted
    assert sorted(p.name for p in root.iterdir()) == ["cityscapes", "prepared.json", "synthia"]  # replaced whole
    params = load_params(params_file)
    syn_reader = make_reader(params.data.source, "train")
    assert len(syn_reader) == 3 and syn_reader.read(2).image.shape == (6, 10, 3)
    gt = cv2.imread(str(root / "synthia/GT/LABELS/0000002.png"), cv2.IMREAD_UNCHANGED)
    assert gt.dtype == np.uint16 and gt.shape == (6, 10, 3)  # still SYNTHIA's 16-bit format


def test_prepare_stage_errors_name_what_is_wrong(tmp_path: Path, archives: tuple[dict[str, bytes], ...],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gta5, cs, syn = archives
    stage = load_stage()
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with LoopbackServer(Behaviour(files={f"/data/{k}": v for k, v in gta5.items()})) as srv:
        sources = write_sources(tmp_path / "sources.yaml", sources_for(srv, None, archives))
        raw = prepare_params("gta5", tmp_path, sources)
        params_file = tmp_path / "p.yaml"

        # a domain that would not read the prepared data
        bad = copy.deepcopy(raw)
        bad["data"]["target"]["root"] = str(tmp_path / "elsewhere")
        params_file.write_text(yaml.safe_dump(bad))
        with pytest.raises(SystemExit) as exc:
            stage.main(["--params", str(params_file), "--no-progress"])
        assert "elsewhere" in str(exc.value.code) and "data.root/<dataset>" in str(exc.value.code)

        # no Cityscapes account: stops naming the variables and the manual folder, and nothing is prepared
        params_file.write_text(yaml.safe_dump(raw))
        with pytest.raises(SystemExit) as exc:
            stage.main(["--params", str(params_file), "--no-progress"])
    msg = str(exc.value.code)
    assert "CITYSCAPES_USERNAME" in msg and "CITYSCAPES_PASSWORD" in msg and str(tmp_path / "manual") in msg
    assert not (tmp_path / "prepared").exists()

    # both the toy pair and real data in one profile
    both = copy.deepcopy(raw)
    both["data"]["embedded"] = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["embedded"]
    params_file.write_text(yaml.safe_dump(both))
    with pytest.raises(SystemExit) as exc:
        stage.main(["--params", str(params_file)])
    assert "data.embedded and data.prepare are both set" in str(exc.value.code)

    # `-S profile=gta5` on the toy params would only relabel them: refused, naming the command that selects it
    relabelled = yaml.safe_load((REPO / "params.yaml").read_text())
    relabelled["profile"] = "gta5"
    params_file.write_text(yaml.safe_dump(relabelled))
    monkeypatch.chdir(REPO)  # where profiles/ is
    with pytest.raises(SystemExit) as exc:
        stage.main(["--params", str(params_file)])
    assert "select the profile with: python -m plca.profile gta5" in str(exc.value.code)
    # only an overlay that switches to real data makes toy params a relabelling (a recipe on the toy pair is fine)
    assert stage._sets_real_data("gta5", REPO) and stage._sets_real_data("synthia", REPO)
    assert not stage._sets_real_data("embedded", REPO)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("adapt: {steps: 3}\n")
    assert not stage._sets_real_data(str(recipe), REPO)


def test_real_data_config_checks_its_splits() -> None:
    ok = from_dict(RealDataConfig, {"datasets": ["gta5", "cityscapes"], "splits": {"cityscapes": ["train", "val"]},
                                    "full_size": {"cityscapes": ["val"]}}, "data.prepare")
    assert ok.resize.short_edge == 988 and ok.download.out_dir == Path("data/raw")
    with pytest.raises(ValueError, match="full_size.cityscapes needs data.prepare.splits.cityscapes"):
        RealDataConfig(["cityscapes"], full_size={"cityscapes": ["val"]})
    with pytest.raises(ValueError, match=r"\['test'\] not in data.prepare.splits.cityscapes"):
        RealDataConfig(["cityscapes"], splits={"cityscapes": ["val"]}, full_size={"cityscapes": ["test"]})
    with pytest.raises(ValueError, match=r"data.prepare.splits: \['synthia'\] not among"):
        RealDataConfig(["gta5"], splits={"synthia": ["all"]})


def test_a_row_trained_otherwise_than_its_profile_is_named_with_its_changes() -> None:
    """`dvc exp run -S` of a variant's options, its method's shared options or a pseudo-label set it learns from
    (directly or through the runs it starts from) marks the row; relabelling it does not."""
    raw = load_yaml(REPO / "params.yaml")
    assert changed_variants(raw, DEFAULT) == {}
    edited = copy.deepcopy(raw)
    edited["variants"]["fass"]["train"]["options"]["lsr"] = True
    edited["variants"]["plca"]["show"]["label"] = "Ours"
    edited["methods"]["advent"]["w_adv_main"] = 0.002
    edited["pseudo"]["crst_p2"]["options"]["portion"] = 0.3
    changed = changed_variants(edited, DEFAULT)
    assert changed["fass"] == ("options.lsr=True",) and "plca" not in changed
    adv = ("methods.advent.w_adv_main=0.002",)
    # AdvEnt's rows, the ensemble built on it and IntraDA's two stages (both AdvEnt); MinEnt alone is untouched
    assert {v: changed[v] for v in ("advent", "advent_minent", "intrada_s1", "intrada")} == dict.fromkeys(
        ("advent", "advent_minent", "intrada_s1", "intrada"), adv)
    assert "minent" not in changed
    # the set labelled by round 1 feeds round 2, which round 3 starts from; round 1 itself is as it was
    assert changed["crst_r2"] == changed["crst"] == ("pseudo.crst_p2.options.portion=0.3",)
    assert "crst_r1" not in changed and "cbst" not in changed


def test_a_variant_its_profile_lacks_is_new_not_changed() -> None:
    raw = load_yaml(REPO / "params.yaml")
    edited = copy.deepcopy(raw)
    edited["variants"]["mine"] = copy.deepcopy(raw["variants"]["fass"])
    edited["variants"]["mine"]["show"]["colour"] = "#010203"
    assert changed_variants(edited, DEFAULT) == {}
