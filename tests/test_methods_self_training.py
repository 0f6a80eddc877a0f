"""CBST / CRST as methods and the class-balanced pseudo-label policy (plca.methods.cbst, plca.methods.crst)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_labelling import RAW, FakeReader, Stub

from plca.data.datasets import read_label_png
from plca.labelling import PseudoSetConfig, build_policy, make_pseudo_set
from plca.losses import self_training_loss
from plca.methods import build_method
from plca.models import DeepLabV2Config, build_model
from plca.models.output import LOGITS
from plca.pseudo import class_balanced_thresholds, hard_pseudo_labels, mining_classes, soft_pseudo_labels

H, W = 4, 6


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_class_balanced_set_equals_the_thresholds_of_the_whole_set_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(7)]
    reader = FakeReader(pixels)
    cfg = PseudoSetConfig(policy="class_balanced", options={"portion": 0.5, "ds_rate": 4}, batch_size=3)
    out = tmp_path / "set"
    summary = make_pseudo_set(Stub(k=4.0), reader, RAW, cfg, out, torch.device("cpu"), progress=False)
    # the policy sees the set in batches of 3 (3 + 3 + 1 images); its thresholds are those of all 7 at once
    logits = torch.tensor(pixels, dtype=torch.float32)[:, :, None, None].expand(-1, -1, H, W) / 255 * 4.0
    probs = logits.softmax(1)
    expected = class_balanced_thresholds(probs, 0.5, ds_rate=4)
    np.testing.assert_allclose(summary["thresholds"], expected.numpy(), rtol=1e-6)
    rare, mine = mining_classes(probs)
    assert (summary["rare_classes"], summary["mine_classes"]) == (rare.tolist(), mine.tolist())
    # every image labelled where p / lambda >= 1, else 255
    assert (out / "labelled.txt").read_text().split() == reader.names and summary["unlabelled"] == 0
    labels = hard_pseudo_labels(probs, expected)
    for i, name in enumerate(reader.names):
        np.testing.assert_array_equal(read_label_png(out / "labels" / f"{name}.png"), labels[i].numpy())
    assert 0 < (labels != 255).float().mean() < 1  # the case keeps some images and drops others
    assert json.loads((out / "summary.json").read_text())["policy"] == "class_balanced"


TINY = DeepLabV2Config(num_classes=5, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source_label = torch.randint(0, 5, (2, 16, 24), generator=g)
    target_label = torch.randint(0, 5, (2, 16, 24), generator=g)
    target_label[0, :8] = 255  # unselected pixels
    target_label[1] = 255  # an image with no pseudo-label at all
    return {"source_image": torch.randn(2, 3, 16, 24, generator=g), "source_label": source_label,
            "target_image": torch.randn(2, 3, 16, 24, generator=g), "target_label": target_label}


@pytest.mark.parametrize(("method", "regularizer", "weight"), [("cbst", "none", 0.0), ("crst", "kld", 0.1)])
def test_cbst_and_crst_train_on_source_and_pseudo_labelled_target_together(method: str, regularizer: str,
                                                                           weight: float) -> None:
    torch.manual_seed(0)
    model = build_model(TINY).train()
    m = build_method(method, model, {})
    assert (m.cfg.regularizer, m.cfg.weight) == (regularizer, weight)  # CRST: MRKLD 0.1, the released code
    batch = _batch()
    out = m.training_step(batch)
    logits = torch.cat([model(batch["source_image"])[LOGITS], model(batch["target_image"])[LOGITS]])
    logits = model.upsample(logits, (16, 24))
    labels = torch.cat([batch["source_label"], batch["target_label"]])
    # the code: image weights = the MR weight on target images, 0 on source ones (effective weight: 0.1^2)
    iw = None if regularizer == "none" else torch.tensor([0.0, 0.0, weight, weight])
    expected = self_training_loss(logits, labels, regularizer=regularizer, weight=weight, image_weights=iw)
    torch.testing.assert_close(out.loss, expected)
    # hand check of the CE part: mean over every labelled pixel of the mixed batch
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    if regularizer == "none":
        torch.testing.assert_close(out.loss, ce)
    else:  # MRKLD on target image 0's labelled pixels: -(1/C) sum_c log q_c, weighted 0.1 x 0.1
        log_q = torch.log_softmax(logits[2], 0)
        valid = batch["target_label"][0] != 255
        r = (-log_q.sum(0) / 5)[valid].sum() / valid.sum()
        torch.testing.assert_close(out.loss, ce + 0.1 * 0.1 * r)
    assert out.terms["target_labelled"] == pytest.approx(float((batch["target_label"] != 255).float().mean()))


def test_a_self_training_method_without_pseudo_labels_says_how_to_run_it() -> None:
    m = build_method("crst", build_model(TINY), {})
    batch = _batch()
    del batch["target_label"]
    with pytest.raises(ValueError, match="train it as a round"):
        m.training_step(batch)


def test_source_and_target_crops_of_another_size_are_refused_with_the_setting_to_change() -> None:
    m = build_method("cbst", build_model(TINY), {})
    batch = _batch()
    batch["target_image"], batch["target_label"] = batch["target_image"][..., :16], batch["target_label"][..., :16]
    with pytest.raises(ValueError, match=r"crops differ in size \(\(16, 24\) vs \(16, 16\)\).*target_transform"):
        m.training_step(batch)


def _lrent_set(reader: FakeReader, out: Path, batch_size: int = 8) -> dict:
    """A class-balanced set with LRENT's soft labels (portion 0.5, alpha 0.25) of the stub's predictions."""
    cfg = PseudoSetConfig(policy="class_balanced", options={"portion": 0.5, "lrent": 0.25}, batch_size=batch_size)
    return make_pseudo_set(Stub(k=4.0), reader, RAW, cfg, out, torch.device("cpu"), progress=False)


def test_lrent_set_writes_soft_labels_that_a_round_reads_back(tmp_path: Path) -> None:
    """`lrent: 0.25` (CRST's lrent.sh): every labelled image gets soft/<name>.npz (float16 LRENT weights, zero where
    dropped) beside its PNG (their argmax, 255 where dropped), and the round's reader gives both back."""
    from plca.labelling import PseudoLabelledReader

    rng = np.random.default_rng(1)
    pixels = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(5)]
    reader = FakeReader(pixels)
    out = tmp_path / "set"
    summary = _lrent_set(reader, out, batch_size=2)
    logits = torch.tensor(pixels, dtype=torch.float32)[:, :, None, None].expand(-1, -1, H, W) / 255 * 4.0
    soft, labels = soft_pseudo_labels(logits.softmax(1), torch.tensor(summary["thresholds"]), 0.25)
    assert sorted(p.name for p in (out / "soft").iterdir()) == sorted(f"{n}.npz" for n in reader.names)
    rounds = PseudoLabelledReader(reader, out)
    assert rounds.soft
    for i, name in enumerate(reader.names):
        with np.load(out / "soft" / f"{name}.npz") as f:
            assert f["soft"].dtype == np.float16
        sample = rounds.read(i)
        np.testing.assert_array_equal(sample.label, labels[i].numpy())
        assert sample.soft_label.dtype == np.float32 and sample.soft_label.shape == (3, H, W)
        np.testing.assert_allclose(sample.soft_label, soft[i].numpy(), atol=1e-3)  # float16 on disk
        dropped = sample.label == 255
        assert (sample.soft_label[:, dropped] == 0).all()
    assert 0 < (labels == 255).float().mean() < 1  # LRENT's rule keeps some pixels and drops others
    # a hard set has no soft folder; its reader gives no soft labels
    make_pseudo_set(Stub(k=4.0), reader, RAW, PseudoSetConfig(policy="class_balanced", options={"portion": 0.5}),
                    tmp_path / "hard", torch.device("cpu"), progress=False)
    assert not (tmp_path / "hard" / "soft").exists() and PseudoLabelledReader(reader, tmp_path / "hard").read(0) \
        .soft_label is None


def test_soft_label_files_missing_corrupt_or_of_another_size_are_named(tmp_path: Path) -> None:
    from plca.labelling import PseudoLabelledReader

    reader = FakeReader([(10, 200, 30), (250, 5, 5)])
    out = tmp_path / "set"
    _lrent_set(reader, out)
    rounds = PseudoLabelledReader(reader, out)
    first, second = (out / "soft" / f"{n}.npz" for n in reader.names)
    first.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"{first}: not a soft pseudo-label file"):
        rounds.read(0)
    np.savez_compressed(first, soft=np.zeros((3, H + 1, W), np.float16))
    with pytest.raises(ValueError, match=rf"soft pseudo-label is \[3, {H + 1}, {W}\], expected \[C, {H}, {W}\]"):
        rounds.read(0)
    second.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{second}: soft pseudo-label not found"):
        rounds.read(1)
    with pytest.raises(ValueError, match="lrent must be >= 0"):
        build_policy("class_balanced", {"lrent": -0.1})


def test_crst_learns_from_soft_target_labels_with_the_source_one_hot() -> None:
    """A batch with `target_soft_label` (a soft set's round): the loss is the soft CE of the mixed batch, the source
    labels one-hot (zero where unlabelled); one-hot target soft labels give the hard labels' loss exactly."""
    torch.manual_seed(0)
    model = build_model(TINY).train()
    m = build_method("crst", model, {})
    batch = _batch()
    logits = model.upsample(torch.cat([model(batch["source_image"])[LOGITS], model(batch["target_image"])[LOGITS]]),
                            (16, 24))
    hard = m.training_step(batch).loss
    valid = batch["target_label"] != 255
    one_hot = torch.nn.functional.one_hot(torch.where(valid, batch["target_label"], 0), 5).permute(0, 3, 1, 2)
    batch["target_soft_label"] = (one_hot * valid[:, None]).float()
    torch.testing.assert_close(m.training_step(batch).loss, hard)
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(2, 5, 16, 24, generator=g).softmax(1) * valid[:, None]
    batch["target_soft_label"] = soft
    out = m.training_step(batch)
    src_valid = batch["source_label"] != 255
    src = torch.nn.functional.one_hot(torch.where(src_valid, batch["source_label"], 0), 5).permute(0, 3, 1, 2)
    target = torch.cat([src * src_valid[:, None], soft]).float()
    iw = torch.tensor([0.0, 0.0, 0.1, 0.1])
    torch.testing.assert_close(out.loss, self_training_loss(logits, target, regularizer="kld", weight=0.1,
                                                            image_weights=iw))
    assert not torch.allclose(out.loss, hard)


def test_a_soft_set_reaches_the_method_as_target_soft_label(tmp_path: Path) -> None:
    """The round's data path: a soft set's reader through the training transform and the stream's dataset gives
    items with `soft_label` beside `label`; batched under the target stream's keys, CRST learns from them."""
    from plca.data.transforms import TransformConfig, train_transform
    from plca.engine.streams import KeyedDataset
    from plca.labelling import PseudoLabelledReader

    reader = FakeReader([(10, 200, 30), (250, 5, 5), (90, 90, 200)])
    out = tmp_path / "set"
    _lrent_set(reader, out)
    tcfg = TransformConfig(short_edge=(6, 8), crop=(4, 4), flip=True)
    ds = KeyedDataset(PseudoLabelledReader(reader, out), lambda s, rng: train_transform(s, tcfg, rng), 0, 1)
    items = [ds[(i, i)] for i in range(3)]
    for item in items:
        assert set(item) == {"image", "label", "soft_label"} and item["soft_label"].shape == (3, 4, 4)
        total = item["soft_label"].sum(0)
        assert torch.allclose(total[total > 0], torch.ones(())) and (total[item["label"] == 255] == 0).all()
    model = build_model(DeepLabV2Config(num_classes=3, depth=18, width=0.125, norm="group", groups=4,
                                        aspp_rates=(1,)))
    m = build_method("crst", model, {"regularizer": "none", "weight": 0.0})
    batch = {"source_image": torch.randn(3, 3, 4, 4), "source_label": torch.randint(0, 3, (3, 4, 4)),
             **{f"target_{k}": torch.stack([it[k] for it in items]) for k in items[0]}}
    loss = m.training_step(batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.branches[0].weight.grad.abs().sum() > 0
