"""The mean-teacher family's recipes (profiles/daformer.yaml, then profiles/pgpc.yaml on top, on a benchmark
profile): merged, they carry the released DAFormer/PGPC setup on the MiT network of params `networks`, and each runs
end to end at tiny sizes on fixtures in the real layouts, with the pipeline's own functions wired as stages/train.py
wires them: the source class statistics (stats/source_classes.json), the network's pretraining (`pretrain_mit`,
0 steps: the ImageNet-initialised MiT), the method's variant from models/pretrain_mit, then its evaluation. A
missing or misshapen SegFormer weights file stops the pretraining with an error naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from real_formats import write_cityscapes, write_gta5, write_synthia
from test_profiles import PROFILES, REPO, SOURCE, TINY_MODEL, write_params
from test_recipes import stacked

from plca.engine.optim import lr_factor, make_optimizer, poly_warmup_factor
from plca.experiment import RunSpec, class_stats_run, evaluate_run, load_model, read_class_stats, train_run
from plca.models import DAFormer, DAFormerConfig, MixVisionTransformer, WeightsError
from plca.models.networks import ARCHS
from plca.models.resnet import ResNet
from plca.params import NETWORK_PRETRAIN, Params
from plca.profiles import Merged

PROFILE_DIR = REPO / "profiles"
NETWORK = "mit"
PRETRAIN_MIT = NETWORK_PRETRAIN + NETWORK  # models/pretrain_mit
#: Each recipe's overlays on the benchmark, and its released iterations.
STACKS = {"daformer": ["daformer"], "pgpc": ["daformer", "pgpc"]}
STEPS = {"daformer": 40000, "pgpc": 60000}
LR, WARMUP, WARMUP_RATIO = 6e-5, 1500, 1e-6
#: MiT-B5 and the released DAFormer head.
B5 = {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "mlp_ratios": (4, 4, 4, 4),
      "depths": (3, 6, 40, 3), "sr_ratios": (8, 4, 2, 1), "drop_path_rate": 0.1, "head_embed_dims": 256,
      "head_channels": 256, "dilations": (1, 6, 12, 18), "dropout_ratio": 0.1, "align_corners": False,
      "num_classes": 19}
#: Each end-to-end case: (benchmark, recipe).
CASES = [("gta5", "daformer"), ("gta5", "pgpc"), ("synthia", "pgpc")]
#: A tiny MiT (4 stages, one block each) and head; SegFormer's mlp and reduction ratios.
TINY_MIT = {"embed_dims": [8, 16, 40, 64], "num_heads": [1, 2, 5, 8], "depths": [1, 1, 1, 1],
            "head_embed_dims": 16, "head_channels": 16, "dilations": [1, 2, 3, 4]}
#: Tiny sizes: 64x64 crops (the stage-4 map: 2x2, the crop / 32) of the source resized to 114x64 (1280x720's
#: aspect) and Cityscapes to 128x64 (1024x512's); evaluation at 64x32.
TINY_CROP, TINY_SOURCE, TINY_TARGET, TINY_EVAL = [64, 64], [114, 64], [128, 64], [64, 32]
N_SOURCE, N_TARGET_TRAIN, N_VAL = 4, 4, 2


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from more


def recipe(bench: str, method: str) -> Merged:
    """What `python -m plca.profile <bench> daformer [pgpc]` writes (the default, then the overlays)."""
    return stacked(bench, *STACKS[method])


# ------------------------------------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("bench", sorted(PROFILES))
@pytest.mark.parametrize("method", sorted(STACKS))
def test_recipe_carries_the_released_setup(bench: str, method: str) -> None:
    p = recipe(bench, method).params
    assert p.profile == "+".join([bench, *STACKS[method]])
    # the network: MiT-B5 + the DAFormer head, SegFormer's ImageNet weights, no source-only warm-up
    net = p.networks[NETWORK]
    assert list(p.networks) == [NETWORK]
    assert (ARCHS[net.arch].network, ARCHS[net.arch].config) == (DAFormer, DAFormerConfig)  # MiT + DAFormer head
    arch, cfg = p.network_options(method)
    assert arch == net.arch and isinstance(cfg, DAFormerConfig)
    assert {k: getattr(cfg, k) for k in B5} == B5
    assert cfg.pretrained == Path("pretrained/mit_b5.pth")
    assert net.model["pretrained"] == "pretrained/mit_b5.pth"
    assert net.pretrain.steps == 0 and net.pretrain.method == "source_only"
    assert p.network_options(PRETRAIN_MIT) == (arch, cfg)  # the pretraining builds the same network
    # DAFormer's AdamW: 6e-5, wd 0.01, (0.9, 0.999), warmup 1500 from 1e-6, poly 1.0 to 0 at the run's end
    o = net.optim
    assert (o.name, o.lr, o.weight_decay, o.betas, o.poly_power, o.poly_horizon) == (
        "adamw", LR, 0.01, (0.9, 0.999), 1.0, None)
    assert (o.warmup_steps, o.warmup_ratio) == (WARMUP, WARMUP_RATIO)
    assert list(o.custom_keys.items()) == [("pos_block", {"decay_mult": 0.0}), ("head", {"lr_mult": 10.0}),
                                          ("norm", {"decay_mult": 0.0})]
    # the variant trains on the network, for the released iterations, with the network's optimiser
    assert p.adapt.steps == STEPS[method]
    assert p.runs.networks == {method: NETWORK}
    assert (p.runs.adapt, p.runs.train_source) == ([], [])
    assert p.runs.evaluate == [method, "oracle"] and p.runs.oracle == "oracle"
    assert p.network_of(method) == NETWORK and p.network_of(PRETRAIN_MIT) == NETWORK
    phase = p.phase(method)
    assert phase.steps == p.steps(method) == STEPS[method] and phase.optim == o
    # 2 source + 2 target images per forward pass; 512x512 crops with flip; evaluation on the 1024x512 image
    assert p.engine.batch_size == 2
    src, tgt = p.transform("source"), p.transform("target")
    assert (src.resize, src.short_edge, src.crop, src.flip) == ((1280, 720), None, (512, 512), True)
    assert (tgt.resize, tgt.short_edge, tgt.crop, tgt.flip) == ((1024, 512), None, (512, 512), True)
    assert (tgt.mean, tgt.std, tgt.channel_order, tgt.scale) == (src.mean, src.std, src.channel_order, src.scale)
    assert p.data.eval_size == (1024, 512)
    # the methods' released sizes (512-row crops), each variant's options valid
    for m in STACKS:
        assert (p.methods[m]["ignore_top"], p.methods[m]["ignore_bottom"]) == (15, 120), m
        assert (p.methods[m]["rcs"]["min_pixels"], p.methods[m]["rcs"]["min_crop_pixels"]) == (3000, 1500), m
    c = p.method_config(method)
    assert (c.alpha, c.ema_before_step, c.threshold, c.ignore_top, c.ignore_bottom, c.batch_union) == (
        0.999, True, 0.968, 15, 120, True)
    assert (c.rcs.temperature, c.rcs.min_pixels, c.rcs.min_crop_pixels, c.rcs.max_tries) == (0.01, 3000, 1500, 10)
    assert (c.w_fd, c.fd_min_ratio) == (0.005, 0.75)
    if method == "pgpc":
        assert (c.contrast_size, c.pseudo_weight, c.w_contrast_src, c.w_contrast_mix, c.pair_order) == (
            (65, 65), 0.8, 1.0, 1.0, "released")
    else:
        assert c.pseudo_weight == 1.0
    for v in p.variants:
        if p.variant(v).train.method is not None:
            p.method_config(v)
    # what the benchmark sets and the recipe leaves alone
    assert p.data.protocol == (19 if bench == "gta5" else 16)
    assert (p.data.source.format, p.data.target.format) == (SOURCE[bench], "cityscapes")
    assert p.model.depth == 101 and p.pretrain.steps == 0


@pytest.mark.parametrize("bench", sorted(PROFILES))
def test_recipe_steps_on_two_plus_two_images(bench: str) -> None:
    p = recipe(bench, "daformer").params
    assert p.engine.batch_size * p.engine.grad_accum == 2


@pytest.mark.parametrize("bench", sorted(PROFILES))
@pytest.mark.parametrize("method", sorted(STACKS))
def test_recipe_oracle_learns_for_all_its_steps(bench: str, method: str) -> None:
    p = recipe(bench, method).params
    assert lr_factor(p.oracle.optim, p.oracle.steps - 1, p.oracle.steps) > 0


# ------------------------------------------------------------------------------------------------ end to end


def tiny_mit_weights(path: Path, seed: int = 123, dims: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A SegFormer-layout mit_b*.pth of the tiny MiT (an ImageNet `head.*` classifier included); its state."""
    torch.manual_seed(seed)
    enc = MixVisionTransformer(embed_dims=tuple(dims or TINY_MIT["embed_dims"]), num_heads=tuple(TINY_MIT["num_heads"]),
                               depths=tuple(TINY_MIT["depths"]))
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    # LayerNorm starts at 1/0: shift them so a file's values are told from a fresh init
    state = {k: v + 0.01 if "norm" in k else v for k, v in state.items()}
    torch.save({**state, "head.weight": torch.randn(1000, enc.embed_dims[-1]), "head.bias": torch.zeros(1000)},
               path)
    return state


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]:
    """Per benchmark: data in the real layouts (<root>/<source>, <root>/cityscapes) and tiny SegFormer weights."""
    out = {}
    for bench in sorted(PROFILES):
        tmp = tmp_path_factory.mktemp(bench)
        root = tmp / "prepared"
        (write_gta5 if SOURCE[bench] == "gta5" else write_synthia)(root / SOURCE[bench], N_SOURCE, size=(36, 64),
                                                                   seed=1)
        write_cityscapes(root / "cityscapes", {"train": N_TARGET_TRAIN, "val": N_VAL}, size=(32, 64), seed=2)
        if bench == "gta5":  # a source val list, for the case that scores source val and asks for cycles
            (root / "gta5" / "val.txt").write_text("00003\n00004\n")
        weights = tmp / "mit_tiny.pth"
        out[bench] = (root, weights, tiny_mit_weights(weights))
    return out


def tiny_recipe(bench: str, method: str, root: Path, weights: Path, tmp: Path, source_val: bool = False) -> Params:
    """The merged recipe with only its sizes made tiny (and the machine's settings: CPU, one thread, no loader
    processes, a log row and a checkpoint per step, no tracking). `source_val`: GTA5's val.txt as the source val
    split, and the cycle diagnostics asked for (PLCA's, which a DAFormer model has none of)."""
    raw = recipe(bench, method).raw
    d = raw["data"]
    d["root"] = str(root)
    d["source"]["root"] = str(root / SOURCE[bench])
    d["target"]["root"] = str(root / "cityscapes")
    d["eval_size"] = TINY_EVAL
    d["train_transform"].update(resize=TINY_SOURCE, crop=TINY_CROP)
    d["target_transform"].update(resize=TINY_TARGET, crop=TINY_CROP)
    raw["model"].update(TINY_MODEL)  # the oracle's DeepLab (not run here)
    raw["networks"][NETWORK]["model"].update(TINY_MIT, pretrained=str(weights))
    raw["engine"].update(num_workers=0, log_every=1, checkpoint_every=1, device="cpu", threads=1)
    raw["adapt"]["steps"] = raw["oracle"]["steps"] = 2
    for m in STACKS:  # the pixel thresholds and rows scaled to the fixtures' 64-row crops
        raw["methods"][m].update(ignore_top=1, ignore_bottom=4)
        raw["methods"][m]["rcs"].update(min_pixels=1, min_crop_pixels=0)
    raw["methods"]["pgpc"]["contrast_size"] = [4, 4]
    raw["evaluate"]["batch_size"] = 2
    if source_val:
        d["source"]["val"] = "val.txt"
        raw["evaluate"].update(source_val=True, cycle_pairs=2)
    raw["tracking"]["enabled"] = False
    return write_params(raw, tmp / "params.yaml")


def model_path(tmp: Path, run: str) -> Path:  # stages/_common.py's layout
    return tmp / "models" / run / "s0" / "model.pt"


def train(p: Params, tmp: Path, name: str, init: Path | None, class_stats: Path | None) -> dict[str, Any]:
    """As stages/train.py wires a run."""
    return train_run(p, RunSpec(name, 0), out_dir=model_path(tmp, name).parent,
                     log_csv=tmp / "logs" / name / "s0.csv", checkpoint_dir=tmp / "checkpoints" / f"{name}-s0",
                     init_model=init, tracking=p.tracking, tags={"profile": p.profile}, progress=False,
                     class_stats=class_stats)


@pytest.mark.parametrize(("bench", "method"), CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_recipe_trains_and_evaluates_end_to_end(bench: str, method: str, tmp_path: Path,
                                                fixtures: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]
                                                ) -> None:
    root, weights, file_state = fixtures[bench]
    source_val = (bench, method) == ("gta5", "pgpc")
    p = tiny_recipe(bench, method, root, weights, tmp_path, source_val)
    # everything but sizes is the recipe's
    o = p.phase(method).optim
    assert (p.engine.batch_size, o.name, o.lr, o.warmup_steps, o.warmup_ratio, o.poly_power) == (
        2, "adamw", LR, WARMUP, WARMUP_RATIO, 1.0)
    arch, tiny = p.network_options(method)
    assert ARCHS[arch].network is DAFormer and tiny.pretrained == weights
    assert (tiny.embed_dims, tiny.depths, tiny.head_channels, tiny.dilations) == (
        (8, 16, 40, 64), (1, 1, 1, 1), 16, (1, 2, 3, 4))
    assert (tiny.sr_ratios, tiny.drop_path_rate, tiny.dropout_ratio) == ((8, 4, 2, 1), 0.1, 0.1)

    # stage class_stats: every source train label's class pixels
    stats = tmp_path / "stats" / "source_classes.json"
    assert class_stats_run(p, stats, progress=False)["images"] == N_SOURCE
    assert len(read_class_stats(stats)) == N_SOURCE

    # stage pretrain_network@mit: 0 steps, the ImageNet-initialised network (the file's encoder, head.* dropped)
    assert train(p, tmp_path, PRETRAIN_MIT, None, None)["steps"] == 0
    start = load_model(model_path(tmp_path, PRETRAIN_MIT))
    assert isinstance(start, DAFormer)
    start_state = start.state_dict()
    backbone = {k[len("backbone."):]: v for k, v in start_state.items() if k.startswith("backbone.")}
    assert set(backbone) == set(file_state)
    for k, v in file_state.items():
        torch.testing.assert_close(backbone[k], v, rtol=0, atol=0, msg=k)
    assert not [k for k in start_state if k.startswith("head.weight") or k.startswith("head.bias")]

    # stage train_network@<method>: from models/pretrain_mit, with the class statistics (its source stream samples
    # rare classes: without them it stops before training)
    with pytest.raises(ValueError, match="rare classes, but no class statistics"):
        train(p, tmp_path, method, model_path(tmp_path, PRETRAIN_MIT), None)
    assert not model_path(tmp_path, method).exists()
    res = train(p, tmp_path, method, model_path(tmp_path, PRETRAIN_MIT), stats)
    assert res["steps"] == p.steps(method) == p.phase(method).steps == 2
    model = load_model(model_path(tmp_path, method))
    assert isinstance(model, DAFormer)
    assert {k: v for k, v in vars(model.cfg).items() if k != "pretrained"} == {
        k: v for k, v in vars(tiny).items() if k != "pretrained"}
    state = model.state_dict()
    assert set(state) == set(start_state)
    moved = {k for k in state if state[k].is_floating_point() and not torch.equal(state[k], start_state[k])}
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.") for k in moved), moved
    for key in ("backbone.patch_embed1.proj.bias", "backbone.block4.0.mlp.fc2.bias", "head.conv_seg.bias"):
        assert key in moved, f"{key} did not move"
    # the head at 10x, the encoder's norms without decay
    groups = make_optimizer(model, o).param_groups
    assert sorted((g["lr"], g["weight_decay"]) for g in groups) == sorted(
        [(LR, 0.01), (LR, 0.0), (LR * 10, 0.01)])

    log = pd.read_csv(tmp_path / "logs" / method / "s0.csv")
    assert list(log["step"]) == [1, 2]
    horizon = p.phase(method).steps  # poly_horizon null: the run's own length
    want = [LR * poly_warmup_factor(s, horizon, warmup_iters=WARMUP, warmup_ratio=WARMUP_RATIO, power=1.0)
            for s in range(2)]
    np.testing.assert_allclose(log["lr"], want, rtol=1e-9)
    assert log["lr"].iloc[0] == pytest.approx(LR * WARMUP_RATIO)  # the warmup's first step
    cols = set(log.columns)
    assert {"loss", "ce", "ce_mix", "pseudo_weight", "fd"} <= cols
    if method == "pgpc":
        assert {"cl_src", "cl_mix"} <= cols
    else:
        assert not {"cl_src", "cl_mix"} & cols
    assert np.isfinite(log.drop(columns="step").to_numpy()).all()
    assert ((log["pseudo_weight"] >= 0) & (log["pseudo_weight"] <= (0.8 if method == "pgpc" else 1.0))).all()

    # stage evaluate@<method>
    m = evaluate_run(p, RunSpec(method, 0), model_path=model_path(tmp_path, method),
                     out_dir=tmp_path / "eval" / method / "s0", metrics_path=tmp_path / "metrics" / method / "s0.json",
                     tracking=p.tracking, tags={"profile": p.profile}, progress=False)
    assert json.loads((tmp_path / "metrics" / method / "s0.json").read_text()) == m
    assert m["variant"] == method and 0 <= m["miou"] <= 100
    assert m["miou"] == (m["miou19"] if bench == "gta5" else m["miou16"])
    assert all(v is None or 0 <= v <= 100 for v in m["iou"].values())
    assert m["miou_without_tta"] is None  # no test-time aggregation
    if source_val:  # scored on source val too; the cycles asked for are DeepLab's (PLCA's association), not made
        assert p.evaluate.cycle_pairs == 2 and 0 <= m["source_val_miou"] <= 100
    else:
        assert m["source_val_miou"] is None
    assert "cycles" not in m
    full = json.loads((tmp_path / "eval" / method / "s0" / "metrics.json").read_text())
    assert full["test_time_aggregation"] is False and "cycles" not in full


# ------------------------------------------------------------------------------------------------ weights files


def _pretrain_with(bench: str, root: Path, weights: Path, tmp: Path) -> tuple[Params, Path]:
    p = tiny_recipe(bench, "daformer", root, weights, tmp)
    return p, model_path(tmp, PRETRAIN_MIT)


def test_missing_mit_weights_stop_the_pretraining(tmp_path: Path,
                                                  fixtures: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]
                                                  ) -> None:
    missing = tmp_path / "pretrained" / "mit_b5.pth"
    p, out = _pretrain_with("gta5", fixtures["gta5"][0], missing, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        train(p, tmp_path, PRETRAIN_MIT, None, None)
    assert str(missing.resolve()) in str(err.value) and "mit_b*" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("layout", ["resnet", "wider_mit", "checkpoint"])
def test_misshapen_mit_weights_stop_the_pretraining(layout: str, tmp_path: Path,
                                                    fixtures: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]
                                                    ) -> None:
    bad = tmp_path / f"{layout}.pth"
    if layout == "resnet":
        torch.save(ResNet(TINY_MODEL["depth"], TINY_MODEL["width"], "batch").state_dict(), bad)
        detail = "missing keys"
    elif layout == "wider_mit":
        tiny_mit_weights(bad, dims=[16, 32, 80, 128])
        detail = "shape mismatches"
    else:  # a training checkpoint wrapping the state_dict
        torch.save({"state_dict": tiny_mit_weights(tmp_path / "inner.pth"), "meta": {}}, bad)
        detail = "'state_dict'"
    p, out = _pretrain_with("gta5", fixtures["gta5"][0], bad, tmp_path)
    with pytest.raises(WeightsError) as err:
        train(p, tmp_path, PRETRAIN_MIT, None, None)
    msg = str(err.value)
    assert str(bad) in msg and detail in msg, msg
    assert "SegFormer's mit_b* layout" in msg and "patch_embed1.proj.weight" in msg, msg
    assert "widths (8, 16, 40, 64)" in msg, msg
    assert not out.exists()
