"""CBST / CRST as methods and the class-balanced pseudo-label policy (plca.methods.cbst, plca.methods.crst)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_labelling import RAW, FakeReader, Stub

from plca.data.datasets import read_label_png
from plca.labelling import PseudoSetConfig, make_pseudo_set
from plca.losses import self_training_loss
from plca.methods import build_method
from plca.models import DeepLabV2Config, build_model
from plca.models.output import LOGITS
from plca.pseudo import class_balanced_thresholds, hard_pseudo_labels, mining_classes

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
