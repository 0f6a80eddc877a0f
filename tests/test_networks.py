"""The networks a run can train (plca.models.networks): model files that name their architecture, a starting model
of the wrong architecture refused, and the class statistics rare class sampling reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plca.engine import checkpoint as ckpt
from plca.experiment import load_init, load_model, read_class_stats, save_model
from plca.models import DAFormer, DAFormerConfig, build_daformer
from plca.models.deeplabv2 import DeepLabV2, DeepLabV2Config, build_model
from plca.models.networks import ARCHS, from_saved, network_config, saved_config

TOY_MIT = DAFormerConfig(embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), head_embed_dims=16, head_channels=16,
                         dilations=(1, 2, 3, 4))
TOY_DEEPLAB = DeepLabV2Config(depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2))


def test_a_daformer_file_names_its_architecture_and_a_deeplab_file_stays_as_it_was(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mit, deeplab = build_daformer(TOY_MIT), build_model(TOY_DEEPLAB)
    assert saved_config(mit)["arch"] == "mit_daformer" and "arch" not in saved_config(deeplab)
    for model in (mit, deeplab):
        path = tmp_path / f"{type(model).__name__}.pt"
        save_model(model, path, {"run": "x"})
        again = load_model(path)
        assert type(again) is type(model) and again.cfg == model.cfg
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
        state = ckpt.load(path)
        assert type(from_saved(state)) is type(model)
    assert set(ARCHS) == {"deeplabv2", "mit_daformer"}


def test_a_run_refuses_a_starting_model_of_another_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "deeplab.pt"
    save_model(build_model(TOY_DEEPLAB), path, {})
    with pytest.raises(ValueError, match=r"deeplab.pt: holds a deeplabv2 network; the run trains a mit_daformer"):
        load_init(build_daformer(TOY_MIT), path, {})
    other = tmp_path / "wide.pt"
    save_model(DAFormer(DAFormerConfig(**{**vars(TOY_MIT), "head_channels": 32})), other, {})
    with pytest.raises(ValueError, match=r"wide.pt: its model differs from the one to train in \['head_channels'\]"):
        load_init(build_daformer(TOY_MIT), other, {})
    start = build_daformer(TOY_MIT)
    save_model(start, tmp_path / "same.pt", {})
    fresh = build_daformer(TOY_MIT)
    load_init(fresh, tmp_path / "same.pt", {})
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert isinstance(load_model(tmp_path / "same.pt"), DAFormer) and not isinstance(start, DeepLabV2)


def test_network_options_are_validated_with_the_key_named() -> None:
    cfg = network_config("mit_daformer", {"embed_dims": [8, 16, 40, 64], "depths": [1, 1, 1, 1]}, "where")
    assert cfg.embed_dims == (8, 16, 40, 64)
    with pytest.raises(ValueError, match="where: unknown architecture 'vit'"):
        network_config("vit", {}, "where")
    with pytest.raises(ValueError, match=r"where: unknown key\(s\) \['width'\]"):
        network_config("mit_daformer", {"width": 1}, "where")
    with pytest.raises(ValueError, match="where: "):
        network_config("mit_daformer", {"depths": [1, 1]}, "where")


def test_class_statistics_are_read_back_and_bad_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"num_classes": 19, "images": 2, "counts": [{"0": 5, "13": 2}, {}]}))
    assert read_class_stats(path) == [{0: 5, 13: 2}, {}]
    with pytest.raises(FileNotFoundError, match="missing.json: no class statistics; the class_stats stage"):
        read_class_stats(tmp_path / "missing.json")
    path.write_text(json.dumps({"counts": 3}))
    with pytest.raises(ValueError, match="stats.json: not the class statistics class_stats writes"):
        read_class_stats(path)
