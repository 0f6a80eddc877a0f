"""The procedural domain pair: layout on disk, determinism, atomic writes, class coverage, domain gap."""

from __future__ import annotations

import json

import numpy as np
import pytest

import plca.data.embedded as emb
from plca.data.datasets import CityscapesReader, GTA5Reader, read_label_png
from plca.data.embedded import (
    BUS,
    CAR,
    SOURCE_LAYOUT,
    TRAIN,
    TRUCK,
    VEHICLE_MAX_H,
    EmbeddedConfig,
    draw_scene,
    generate_pair,
    image_rng,
    layout_for,
    render_pair_image,
)
from plca.data.labels import CITYSCAPES_VALID_IDS, NUM_CLASSES

TINY = dict(height=32, width=64, n_source_train=5, n_source_val=2, n_target_train=6, n_target_val=3, n_cities=2)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb") / "pair"
    summary = generate_pair(root, EmbeddedConfig(seed=3, **TINY), progress=False)
    return root, summary


def test_layout_and_names(pair):
    root, _ = pair
    src, tgt = root / "source", root / "target"
    assert sorted(p.name for p in (src / "images").iterdir()) == [f"{i:05d}.png" for i in range(1, 8)]
    assert sorted(p.name for p in (src / "labels").iterdir()) == [f"{i:05d}.png" for i in range(1, 8)]
    assert (src / "split" / "train.txt").read_text().split() == ["00001", "00002", "00003", "00004", "00005"]
    assert (src / "split" / "val.txt").read_text().split() == ["00006", "00007"]
    # Cityscapes: different cities per split, names city_seq_frame
    assert sorted(p.name for p in (tgt / "leftImg8bit" / "train").iterdir()) == ["traincity0", "traincity1"]
    assert sorted(p.name for p in (tgt / "leftImg8bit" / "val").iterdir()) == ["valcity0", "valcity1"]
    assert (tgt / "leftImg8bit" / "train" / "traincity1" / "traincity1_000002_000019_leftImg8bit.png").is_file()
    assert (tgt / "gtFine" / "val" / "valcity0" / "valcity0_000001_000019_gtFine_labelIds.png").is_file()
    assert len(list((tgt / "gtFine").rglob("*.png"))) == 9
    assert not list(root.parent.glob(".pair.tmp-*"))  # temporary folder renamed away


def test_readable_by_readers_with_valid_ids(pair):
    root, _ = pair
    src = GTA5Reader(root / "source", ids=root / "source" / "split" / "train.txt")
    assert len(src) == 5 and len(GTA5Reader(root / "source", ids=root / "source" / "split" / "val.txt")) == 2
    tgt = CityscapesReader(root / "target", "train")
    assert len(tgt) == 6 and len(CityscapesReader(root / "target", "val")) == 3
    for reader in (src, tgt):
        for i in range(len(reader)):
            s = reader.read(i)
            assert s.image.shape == (32, 64, 3) and s.label.shape == (32, 64)
            assert set(np.unique(s.label)) <= set(range(NUM_CLASSES)) | {255}
        raw = read_label_png(reader.label_paths[0])
        assert raw.ndim == 2 and raw.dtype == np.uint8
        assert set(np.unique(raw).tolist()) <= CITYSCAPES_VALID_IDS
    # what the reader returns is exactly what the generator drew
    image, label = render_pair_image(EmbeddedConfig(seed=3, **TINY), "target", "train", 4)
    s = tgt.read(tgt.names.index("traincity0_000002_000019"))
    np.testing.assert_array_equal(s.image, image)
    np.testing.assert_array_equal(s.label, label)


def test_summary(pair):
    root, summary = pair
    assert json.loads((root / "summary.json").read_text()) == summary
    assert summary["domains"]["source"]["images"] == {"train": 5, "val": 2}
    assert summary["domains"]["target"]["images"] == {"train": 6, "val": 3}
    frac = summary["domains"]["target"]["class_pixel_fraction"]["train"]
    assert abs(sum(frac.values()) - 1) < 1e-3 and frac["road"] > 0.05 and frac["train"] == 0


def test_deterministic_and_independent_of_workers(pair, tmp_path):
    root, _ = pair
    again = tmp_path / "again"
    generate_pair(again, EmbeddedConfig(seed=3, workers=2, **TINY), progress=False)
    assert _files(again) == _files(root)
    other = tmp_path / "other"
    generate_pair(other, EmbeddedConfig(seed=4, **TINY), progress=False)
    a, b = _files(root), _files(other)
    assert a.keys() == b.keys()
    assert a["source/images/00001.png"] != b["source/images/00001.png"]


def test_interrupted_run_leaves_nothing_and_keeps_old(tmp_path, monkeypatch):
    root = tmp_path / "pair"
    calls = {"n": 0}
    real = emb._run_job

    def failing(cfg, job):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(cfg, job)

    monkeypatch.setattr(emb, "_run_job", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_pair(root, EmbeddedConfig(**TINY), progress=False)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    root.mkdir()
    (root / "marker").write_text("old")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        generate_pair(root, EmbeddedConfig(**TINY), progress=False)
    assert (root / "marker").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["pair"]
    monkeypatch.setattr(emb, "_run_job", real)
    generate_pair(root, EmbeddedConfig(**TINY), progress=False)  # success replaces the old folder
    assert not (root / "marker").exists() and (root / "summary.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pair"]


def _scenes(domain: str, shift: float, n: int):
    lay = layout_for(domain, shift)
    for i in range(n):
        rng = image_rng(0, domain, "train", i)
        yield draw_scene(rng, 64, 128, lay), rng


def test_classes_drawn_and_vehicles_capped():
    for domain in ("source", "target"):
        present = set()
        for cv, _ in _scenes(domain, 0.6, 60):
            present |= set(np.unique(cv.label).tolist())
            for k, cls in enumerate(cv.classes):
                if cls in (CAR, TRUCK, BUS):
                    rows = np.nonzero((cv.inst == k).any(axis=1))[0]
                    if rows.size:
                        assert rows.max() - rows.min() + 1 <= VEHICLE_MAX_H * 64 + 2
        present.discard(255)
        assert len(present) >= 17, (domain, sorted(present))
        assert TRAIN not in present


def _class_means(domain: str, shift: float) -> dict[int, np.ndarray]:
    cfg = EmbeddedConfig(shift=shift)
    sums, counts = np.zeros((NUM_CLASSES, 3)), np.zeros(NUM_CLASSES)
    for i in range(30):
        image, label = render_pair_image(cfg, domain, "train", i)
        for c in np.unique(label):
            if c < NUM_CLASSES:
                m = label == c
                sums[c] += image[m].sum(0)
                counts[c] += m.sum()
    return {c: sums[c] / counts[c] for c in range(NUM_CLASSES) if counts[c] > 200}


def test_target_differs_from_source_by_shift():
    src = _class_means("source", 0.6)
    far = _class_means("target", 0.6)
    near = _class_means("target", 0.0)
    big = [c for c in (0, 1, 2, 8, 10) if c in src and c in far and c in near]  # road, sidewalk, building, veg, sky
    assert len(big) == 5
    for c in big:
        assert np.abs(far[c] - src[c]).max() > 15, c  # a visible colour shift per class
        assert np.abs(near[c] - src[c]).max() < 6, c  # shift 0: the same look
    # layout: the target's horizon is higher, so its road starts higher up
    assert layout_for("target", 0.0) == SOURCE_LAYOUT
    tops = {d: np.mean([np.nonzero((cv.label == 0).any(1))[0].min() for cv, _ in _scenes(d, 0.6, 40)]) for d in
            ("source", "target")}  # fmt: skip
    assert tops["target"] < tops["source"] - 2


def test_config_validation():
    with pytest.raises(ValueError, match="shift"):
        EmbeddedConfig(shift=1.5)
    with pytest.raises(ValueError, match="at least one image"):
        EmbeddedConfig(n_target_val=0)
    with pytest.raises(ValueError, match="5 digits"):
        EmbeddedConfig(n_source_train=99999, n_source_val=1)
