"""TPLD as pseudo-label policies and a method (plca.methods.tpld): phase 1's voted sets and bootstrapped CRST step,
phase 2's easy/hard sets with full labels and the hard-to-easy game."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_labelling import RAW

from plca.data.datasets import Sample, read_label_png
from plca.labelling import PseudoSetConfig, make_pseudo_set
from plca.losses import self_training_loss
from plca.methods import build_method
from plca.models import DeepLabV2Config, build_model
from plca.models.output import LOGITS, SegmentationModel
from plca.pseudo import (
    class_balanced_thresholds,
    full_pseudo_labels,
    hard_pseudo_labels,
    image_confidence,
    split_easy_hard,
    vote_densify,
)

H, W = 6, 8


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class NoisyReader:
    """Images of random colours per pixel: with `CountingStub` their channels are the three classes' logits."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (H, W, 3)).astype(np.uint8) for _ in range(n)]
        self.names = [f"img{i}" for i in range(n)]
        self.root = Path("noisy")

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> Sample:
        return Sample(image=self.images[i], label=None, name=self.names[i])


class CountingStub(SegmentationModel):
    """logits = k x input, counting its forward passes."""

    def __init__(self, k: float = 4.0) -> None:
        super().__init__()
        self.k, self.calls = k, 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {LOGITS: self.k * x}


def _probs(reader: NoisyReader, k: float = 4.0) -> torch.Tensor:
    images = torch.tensor(np.stack(reader.images), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return (k * images).softmax(1)


def test_vote_set_is_the_class_balanced_labels_densified_by_voting(tmp_path: Path) -> None:
    reader = NoisyReader(5)
    options = {"portion": 0.5, "ds_rate": 1, "window": 3, "alpha": 0.7, "iterations": 3}
    cfg = PseudoSetConfig(policy="class_balanced_vote", options=options, batch_size=2)
    out = tmp_path / "set"
    summary = make_pseudo_set(CountingStub(), reader, RAW, cfg, out, torch.device("cpu"), progress=False)
    probs = _probs(reader)
    thresholds = class_balanced_thresholds(probs, 0.5, ds_rate=1)  # of the whole set, not of a batch
    np.testing.assert_allclose(summary["thresholds"], thresholds.numpy(), rtol=1e-6)
    hard = hard_pseudo_labels(probs, thresholds)
    dense = vote_densify(probs, thresholds, hard, window=3, alpha=0.7, iterations=3)
    got = np.stack([read_label_png(out / "labels" / f"{n}.png") for n in reader.names])
    np.testing.assert_array_equal(got, dense.numpy())
    # the case exercises the vote: some pixels CBST leaves unlabelled are labelled, some stay unlabelled
    assert int(((hard == 255) & (dense != 255)).sum()) > 0
    assert int((dense == 255).sum()) > 0
    assert (out / "labelled.txt").read_text().split() == reader.names and not (out / "soft").exists()


def test_vote_policy_rejects_soft_labels() -> None:
    with pytest.raises(ValueError, match="class_balanced_vote: lrent"):
        make_pseudo_set(CountingStub(), NoisyReader(1), RAW,
                        PseudoSetConfig(policy="class_balanced_vote", options={"lrent": 0.25}), Path("unused"),
                        torch.device("cpu"), progress=False)


def test_easy_hard_set_ranks_by_confidence_and_labels_the_easy_images_in_full(tmp_path: Path) -> None:
    reader = NoisyReader(7, seed=1)
    model = CountingStub()
    cfg = PseudoSetConfig(policy="easy_hard", options={"portion": 0.4, "ds_rate": 1, "q": 0.3, "gamma": 2.0},
                          batch_size=3)
    out = tmp_path / "set"
    summary = make_pseudo_set(model, reader, RAW, cfg, out, torch.device("cpu"), progress=False)
    # three passes (scoring, reviewing, labelling) over 3 batches, the network run once a batch (outputs kept)
    assert model.calls == 3
    probs = _probs(reader)
    thresholds = class_balanced_thresholds(probs, 0.4, ds_rate=1)
    confidence = image_confidence(probs, thresholds)
    easy = split_easy_hard(confidence, 0.3)  # floor(0.3 x 7) = 2 images
    easy_names = [n for n, e in zip(reader.names, easy.tolist(), strict=True) if e]
    assert len(easy_names) == 2 and len(set(confidence.tolist())) == 7  # no tie decides the case
    assert (out / "labelled.txt").read_text().split() == easy_names
    assert (out / "unlabelled.txt").read_text().split() == [n for n in reader.names if n not in easy_names]
    assert (summary["labelled"], summary["unlabelled"]) == (2, 5)
    assert summary["easy_min_confidence"] == pytest.approx(min(confidence[easy].tolist()), rel=1e-6)
    with (out / "images.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    for i, name in enumerate(reader.names):
        assert float(rows[name]["score"]) == pytest.approx(float(confidence[i]), rel=1e-6)
    full = full_pseudo_labels(probs, thresholds, 2.0)
    hard = hard_pseudo_labels(probs, thresholds)
    for name in easy_names:
        i = reader.names.index(name)
        with np.load(out / "soft" / f"{name}.npz") as f:
            np.testing.assert_array_equal(f["soft"], full[i].numpy().astype(np.float16))
        np.testing.assert_array_equal(read_label_png(out / "labels" / f"{name}.png"), hard[i].numpy())
    # every pixel of an easy image has a target; some are one-hot (confident), some r^2 (not)
    assert bool((full[easy].sum(1) > 0).all())
    assert 0 < int((hard[easy] == 255).sum()) < int(hard[easy].numel())
    assert not (out / "labels" / f"{reader.names[int(np.flatnonzero(~easy.numpy())[0])]}.png").exists()
    assert json.loads((out / "summary.json").read_text())["policy"] == "easy_hard"


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_easy_hard_q_is_a_share(q: float) -> None:
    with pytest.raises(ValueError, match=r"easy_hard: q must be a share in \(0, 1\)"):
        make_pseudo_set(CountingStub(), NoisyReader(1), RAW, PseudoSetConfig(policy="easy_hard", options={"q": q}),
                        Path("unused"), torch.device("cpu"), progress=False)


TINY = DeepLabV2Config(num_classes=5, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2))
THRESHOLDS = [0.5, 0.25, 0.8, 0.4, 0.1]


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source_label = torch.randint(0, 5, (2, 16, 24), generator=g)
    source_label[1, :4] = 255
    target_label = torch.randint(0, 5, (2, 16, 24), generator=g)
    target_label[0, :8] = 255  # pixels the set left unlabelled
    return {"source_image": torch.randn(2, 3, 16, 24, generator=g), "source_label": source_label,
            "target_image": torch.randn(2, 3, 16, 24, generator=g), "target_label": target_label}


def _pair(options: dict, crst_options: dict) -> tuple:
    torch.manual_seed(0)
    model = build_model(TINY)
    tpld = build_method("tpld", model, options)
    crst = build_method("crst", model, crst_options)  # the same network
    tpld.set_pseudo_labels({"thresholds": THRESHOLDS, "policy": "class_balanced_vote"})
    return tpld, crst


@pytest.mark.parametrize(("regularizer", "weight"), [("none", 0.0), ("kld", 0.1)])
def test_phase_one_with_beta_one_is_crst_plus_the_log_thresholds_of_the_target_labels(regularizer: str,
                                                                                          weight: float) -> None:
    """beta = 1: -sum t (log q - log lambda) = CE + log lambda_y per labelled target pixel, so the step is CRST's
    (same pooled mean over the batch's labelled pixels, same regulariser) + sum log lambda_y / #labelled."""
    options = {"regularizer": regularizer, "weight": weight}
    tpld, crst = _pair({**options, "bootstrap": 1.0}, options)
    batch = _batch()
    got, base = tpld.training_step(batch).loss, crst.training_step(batch).loss
    target = batch["target_label"]
    valid = target != 255
    labelled = int(valid.sum()) + int((batch["source_label"] != 255).sum())
    shift = torch.tensor(THRESHOLDS).log()[target[valid]].sum() / labelled
    assert float(got.detach()) == pytest.approx(float(base.detach() + shift), rel=1e-5)


def test_phase_one_without_bootstrapping_is_crst() -> None:
    tpld, crst = _pair({"bootstrap": None}, {})
    batch = _batch()
    assert float(tpld.training_step(batch).loss.detach()) == float(crst.training_step(batch).loss.detach())


def test_phase_one_bootstraps_toward_the_prediction_and_needs_the_thresholds() -> None:
    tpld, _ = _pair({"bootstrap": 0.5, "regularizer": "none", "weight": 0.0}, {})
    batch = _batch()
    up = [tpld.model.upsample(tpld.model(batch[f"{s}_image"])[LOGITS], (16, 24)) for s in ("source", "target")]
    n_s, n_t = int((batch["source_label"] != 255).sum()), int((batch["target_label"] != 255).sum())
    expected = (n_s * self_training_loss(up[0], batch["source_label"])
                + n_t * self_training_loss(up[1], batch["target_label"], bootstrap=0.5, thresholds=THRESHOLDS))
    want = float(expected.detach()) / (n_s + n_t)
    assert float(tpld.training_step(batch).loss.detach()) == pytest.approx(want, rel=1e-5)
    fresh = build_method("tpld", build_model(TINY), {})
    with pytest.raises(ValueError, match="bootstrapping needs the class thresholds"):
        fresh.training_step(batch)
    fresh.set_pseudo_labels({"policy": "entropy_rank"})  # a set without thresholds leaves none
    with pytest.raises(ValueError, match="summary.json has none"):
        fresh.training_step(batch)


def _phase_two_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(2, 5, 64, 64, generator=g)
    return {"source_image": torch.randn(2, 3, 64, 64, generator=g), "source_label": soft.argmax(1),
            "source_soft_label": soft, "target_image": torch.randn(2, 3, 64, 64, generator=g)}


def test_phase_two_learns_the_easy_images_and_aligns_the_hard_ones_through_the_discriminator_only() -> None:
    torch.manual_seed(0)
    method = build_method("tpld", build_model(TINY), {"phase": 2, "w_adv": 0.0})
    method.set_pseudo_labels({"thresholds": THRESHOLDS})
    assert set(method.networks()) == {"model", "d_main"}
    assert method.optimizers(method.cfg.d_optim)["d_main"].name == "adam"
    batch = _phase_two_batch()
    out = method.training_step(batch)
    assert set(out.terms) == {"st_loss", "adv_main", "d_main"}
    out.loss.backward()
    model_grads = [p.grad.clone() for p in method.model.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.discriminators["d_main"].parameters())
    # with lambda_adv = 0 the segmenter's gradient is the easy images' loss alone: the hard images reach D only
    method.model.zero_grad()
    cfg = method.cfg
    logits = method.model.upsample(method.model(batch["source_image"])[LOGITS], (64, 64))
    easy = self_training_loss(logits, batch["source_soft_label"], regularizer="kld", weight=cfg.weight,
                              image_weights=[cfg.weight] * 2, bootstrap=cfg.bootstrap, thresholds=THRESHOLDS)
    assert float(out.terms["st_loss"]) == pytest.approx(float(easy.detach()), rel=1e-5)
    easy.backward()
    for got, p in zip(model_grads, method.model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    # lambda_adv > 0: the generator term reaches the segmenter
    method.cfg.w_adv = 1.0
    method.model.zero_grad()
    method.training_step(batch).loss.backward()
    assert any(not torch.allclose(g, p.grad) for g, p in zip(model_grads, method.model.parameters(), strict=True))


def test_phase_two_needs_the_full_labels_and_phase_one_has_no_discriminator() -> None:
    method = build_method("tpld", build_model(TINY), {"phase": 2})
    method.set_pseudo_labels({"thresholds": THRESHOLDS})
    batch = _phase_two_batch()
    del batch["source_soft_label"]
    with pytest.raises(ValueError, match="phase 2 learns the easy images' full"):
        method.training_step(batch)
    assert set(build_method("tpld", build_model(TINY), {}).networks()) == {"model"}
    with pytest.raises(ValueError, match="bootstrap must be in"):
        build_method("tpld", build_model(TINY), {"bootstrap": 1.5})
