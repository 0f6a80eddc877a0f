"""Pseudo-label sets (plca.labelling, IntraDA's entropy_rank policy), ensembles (plca.models.ensemble) and loading a
starting model into a network with an added part (plca.experiment.load_init)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from plca.data.datasets import Sample, read_label_png
from plca.data.transforms import TransformConfig
from plca.experiment import load_init, load_model, save_ensemble, save_model
from plca.labelling import (
    POLICIES,
    Policy,
    PseudoLabelledReader,
    PseudoSetConfig,
    Selection,
    SubsetReader,
    make_pseudo_set,
    register_policy,
)
from plca.models import DeepLabV2, DeepLabV2Config, build_model
from plca.models.ensemble import Ensemble
from plca.models.output import LOGITS, SegmentationModel
from plca.pseudo import image_entropy

H, W = 4, 6


@dataclass
class NoOptions:
    pass
#: no normalisation: the stub model sees the raw pixel values / 255
RAW = TransformConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), flip=False)


class FakeReader:
    """Images whose three channels are the stub model's three logits (x 255)."""

    def __init__(self, pixels: list[tuple[int, int, int]], labels: list[np.ndarray] | None = None) -> None:
        self.names = [f"img{i}" for i in range(len(pixels))]
        self.root = Path("fake")
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> Sample:
        image = np.empty((H, W, 3), np.uint8)
        image[:] = self.pixels[i]
        label = None if self.labels is None else self.labels[i]
        return Sample(image=image, label=label, name=self.names[i])


class Stub(SegmentationModel):
    """logits = k x input: an image's colour is its (constant) prediction."""

    def __init__(self, k: float = 10.0) -> None:
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {LOGITS: self.k * x}


# By entropy, most confident first: img2, img0 = img3 (a tie), img4, img1, img5.
PIXELS = [(200, 0, 0), (100, 60, 60), (0, 0, 255), (200, 0, 0), (150, 40, 40), (80, 70, 70)]


def _set(tmp_path: Path, reader: FakeReader, **options: object) -> tuple[dict, Path]:
    cfg = PseudoSetConfig(policy="entropy_rank", options=dict(options), batch_size=4)
    out = tmp_path / "set" / "s0"
    return make_pseudo_set(Stub(), reader, RAW, cfg, out, torch.device("cpu"), progress=False), out


def test_entropy_rank_labels_the_most_confident_share_with_their_argmax(tmp_path: Path) -> None:
    truth = [np.zeros((H, W), np.uint8) for _ in PIXELS]
    truth[2][:] = 2  # img2 predicts class 2 everywhere, rightly
    truth[0][:, :3] = 1  # img0: half its pixels disagree with its pseudo-label (class 0)
    truth[4][0, 0] = 255  # img4: one unlabelled ground-truth pixel, left out of both counts
    reader = FakeReader(PIXELS, truth)
    summary, out = _set(tmp_path, reader, ratio=0.67)
    x = torch.tensor(PIXELS, dtype=torch.float32)[:, :, None, None].expand(-1, -1, H, W) / 255 * 10
    scores = image_entropy(x)
    order = sorted(range(len(PIXELS)), key=lambda i: (float(scores[i]), i))  # stable: ties in reader order
    easy = [f"img{i}" for i in order[: int(6 * 0.67)]]
    assert easy == ["img2", "img0", "img3", "img4"]  # img0 and img3 tie: reader order
    assert (out / "labelled.txt").read_text().split() == easy
    assert sorted((out / "unlabelled.txt").read_text().split()) == sorted(set(reader.names) - set(easy))
    assert sorted(p.stem for p in (out / "labels").glob("*.png")) == sorted(easy)
    for name in easy:  # argmax of a constant prediction: one class over the whole image, no ignore
        i = reader.names.index(name)
        assert (read_label_png(out / "labels" / f"{name}.png") == int(np.argmax(PIXELS[i]))).all()
    rows = list(csv.DictReader((out / "images.csv").open()))
    assert [r["name"] for r in rows] == reader.names
    assert {r["name"] for r in rows if r["split"] == "labelled"} == set(easy)
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores.numpy(), rtol=1e-6)
    # precision over the labelled images' labelled pixels: img0 has 12 of 24 right, the others all right
    valid = 4 * H * W - 1
    assert summary["precision"] == pytest.approx((valid - 12) / valid)
    assert summary["coverage"] == 1.0 and (summary["labelled"], summary["unlabelled"]) == (4, 2)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_rare_classes_rank_images_that_show_them_as_easier(tmp_path: Path) -> None:
    # two equally uncertain images: one predicts class 0, the other class 2... both not rare; with 19-class logits
    # the rare-class factor needs rare ids, so check the policy passes the option through to image_entropy
    _, plain = _set(tmp_path / "a", FakeReader(PIXELS), ratio=0.5)
    _, rare = _set(tmp_path / "b", FakeReader(PIXELS), ratio=0.5, rare_classes=True)
    s_plain = [float(r["score"]) for r in csv.DictReader((plain / "images.csv").open())]
    s_rare = [float(r["score"]) for r in csv.DictReader((rare / "images.csv").open())]
    # none of classes 0, 1, 2 is rare (k = 0): every score x ((K - 0) / K + 0.5) = 1.5
    np.testing.assert_allclose(s_rare, np.array(s_plain) * 1.5, rtol=1e-6)


def test_a_failing_policy_leaves_no_set_and_keeps_the_previous_one(tmp_path: Path) -> None:
    @register_policy(NoOptions)
    class Broken(Policy):
        name = "broken_test_policy"

        def observe(self, names: list[str], logits: torch.Tensor) -> None:
            pass

        def select(self) -> Selection:
            return Selection(labelled=["img0", "img1"], unlabelled=["img2", "img3", "img4", "img5"])

        def label(self, name: str, logits: torch.Tensor) -> np.ndarray:
            if name == "img1":
                raise RuntimeError("killed while labelling")
            return np.zeros(logits.shape[-2:], np.uint8)

    try:
        _, out = _set(tmp_path, FakeReader(PIXELS))  # a whole set first
        before = sorted(p.name for p in out.rglob("*"))
        cfg = PseudoSetConfig(policy="broken_test_policy")
        with pytest.raises(RuntimeError, match="killed while labelling"):
            make_pseudo_set(Stub(), FakeReader(PIXELS), RAW, cfg, out, torch.device("cpu"), progress=False)
        assert sorted(p.name for p in out.rglob("*")) == before  # untouched
        assert [p.name for p in out.parent.iterdir()] == ["s0"]  # no half-written folder beside it
        with pytest.raises(RuntimeError):
            make_pseudo_set(Stub(), FakeReader(PIXELS), RAW, cfg, tmp_path / "new", torch.device("cpu"),
                            progress=False)
        assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
    finally:
        POLICIES.pop("broken_test_policy", None)


def test_a_split_that_loses_an_image_is_refused(tmp_path: Path) -> None:
    @register_policy(NoOptions)
    class Lossy(Policy):
        name = "lossy_test_policy"

        def observe(self, names: list[str], logits: torch.Tensor) -> None:
            pass

        def select(self) -> Selection:
            return Selection(labelled=["img0"], unlabelled=["img1"])

    try:
        cfg = PseudoSetConfig(policy="lossy_test_policy")
        with pytest.raises(RuntimeError, match="did not split the images exactly once each"):
            make_pseudo_set(Stub(), FakeReader(PIXELS), RAW, cfg, tmp_path / "x", torch.device("cpu"),
                            progress=False)
    finally:
        POLICIES.pop("lossy_test_policy", None)
    with pytest.raises(ValueError, match="unknown pseudo-label policy 'nope'"):
        make_pseudo_set(Stub(), FakeReader(PIXELS), RAW, PseudoSetConfig(policy="nope"), tmp_path / "y",
                        torch.device("cpu"), progress=False)


def test_readers_of_a_set_give_labelled_images_their_pseudo_labels_and_the_rest_none(tmp_path: Path) -> None:
    reader = FakeReader(PIXELS, [np.full((H, W), 7, np.uint8) for _ in PIXELS])  # ground truth never read back
    _, out = _set(tmp_path, reader)
    easy = PseudoLabelledReader(reader, out)
    assert easy.names == (out / "labelled.txt").read_text().split()
    for i, name in enumerate(easy.names):
        sample = easy.read(i)
        assert sample.name == name and (sample.label == np.argmax(PIXELS[reader.names.index(name)])).all()
    hard = SubsetReader(reader, (out / "unlabelled.txt").read_text().split(), "hard")
    assert all(hard.read(i).label is None for i in range(len(hard)))
    with pytest.raises(ValueError, match=r"hard: 1 image\(s\) not in fake \(e.g. gone\)"):
        SubsetReader(reader, ["img0", "gone"], "hard")
    bad = out / "labels" / f"{easy.names[0]}.png"
    from plca.io import atomic_write_png

    atomic_write_png(np.zeros((2, 2), np.uint8), bad)
    with pytest.raises(ValueError, match="pseudo-label is 2x2"):
        easy.read(0)
    with pytest.raises(FileNotFoundError, match="no such pseudo-label list"):
        PseudoLabelledReader(reader, tmp_path)


# ------------------------------------------------------------------------------------------------ ensembles

TINY = DeepLabV2Config(num_classes=5, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2),
                       align_corners=True)


def test_an_ensemble_averages_its_members_logits_and_upsamples_as_they_do(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = build_model(TINY).eval(), build_model(TINY).eval()
    x = torch.randn(2, 3, 32, 48)
    ens = Ensemble([a, b], [0.5, 0.5]).eval()
    with torch.no_grad():
        la, lb, le = a(x)[LOGITS], b(x)[LOGITS], ens(x)[LOGITS]
        # ADVENT: the average of the upsampled logits; upsampling the average is the same (bilinear is linear)
        expected = 0.5 * a.upsample(la, (32, 48)) + 0.5 * b.upsample(lb, (32, 48))
        torch.testing.assert_close(ens.upsample(le, (32, 48)), expected, rtol=1e-5, atol=1e-6)
    assert set(ens(x)) == {LOGITS}  # no feature map: no test-time aggregation, no cycle diagnostic
    save_model(a, tmp_path / "a.pt", {})
    save_model(b, tmp_path / "b.pt", {})
    save_ensemble([tmp_path / "a.pt", tmp_path / "b.pt"], (0.25, 0.75), tmp_path / "e.pt", {"run": "e"})
    loaded = load_model(tmp_path / "e.pt").eval()
    assert isinstance(loaded, Ensemble) and loaded.weights == [0.25, 0.75] and loaded.align_corners
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[LOGITS], 0.25 * la + 0.75 * lb, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="is an ensemble itself"):
        save_ensemble([tmp_path / "e.pt", tmp_path / "a.pt"], (0.5, 0.5), tmp_path / "ee.pt", {})
    other = build_model(DeepLabV2Config(**{**vars(TINY), "align_corners": False}))
    with pytest.raises(ValueError, match="upsample alike"):
        Ensemble([a, other], [0.5, 0.5])


# ------------------------------------------------------------------------------------------------ load_init


def test_a_method_that_adds_the_aux_head_starts_from_a_model_without_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = build_model(TINY)
    save_model(start, tmp_path / "start.pt", {})
    torch.manual_seed(1)
    model = DeepLabV2(DeepLabV2Config(**{**vars(TINY), "aux_head": True}))
    aux_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("aux_classifier.")}
    assert aux_before
    load_init(model, tmp_path / "start.pt", {"aux_head": True})
    state = model.state_dict()
    for key, value in start.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    for key, value in aux_before.items():  # the added head keeps its fresh initialisation
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # without the method asking for it, a missing head is an error; so is any other difference of the model
    with pytest.raises(ValueError, match=r"differs from the one to train in \['aux_head'\]"):
        load_init(DeepLabV2(DeepLabV2Config(**{**vars(TINY), "aux_head": True})), tmp_path / "start.pt", {})
    with pytest.raises(ValueError, match=r"differs from the one to train in \['depth'\]"):
        load_init(DeepLabV2(DeepLabV2Config(**{**vars(TINY), "depth": 34})), tmp_path / "start.pt", {})
    # a starting model that lacks more than the added part
    state = torch.load(tmp_path / "start.pt", weights_only=False)
    del state["state_dict"]["classifier.branches.0.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="classifier.branches.0.weight"):
        load_init(DeepLabV2(DeepLabV2Config(**{**vars(TINY), "aux_head": True})), tmp_path / "broken.pt",
                  {"aux_head": True})


@pytest.mark.parametrize("cache_bytes", [2 << 30, 3 * H * W * 4 * 4, 0])  # all, the first batch only, none
def test_the_labelling_pass_reuses_the_scoring_pass_outputs_and_writes_the_same_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_bytes: int) -> None:
    import plca.labelling as labelling

    class Counting(Stub):
        calls = 0

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            Counting.calls += 1
            return super().forward(x)

    cfg = PseudoSetConfig(policy="entropy_rank", options={"ratio": 0.5}, batch_size=4)  # 6 images: batches 4 + 2
    monkeypatch.setattr(labelling, "OUTPUT_CACHE_BYTES", 0)
    make_pseudo_set(Counting(), FakeReader(PIXELS), RAW, cfg, tmp_path / "plain", torch.device("cpu"),
                    progress=False)
    assert Counting.calls == 4  # both passes predict both batches
    Counting.calls = 0
    monkeypatch.setattr(labelling, "OUTPUT_CACHE_BYTES", cache_bytes)
    make_pseudo_set(Counting(), FakeReader(PIXELS), RAW, cfg, tmp_path / "cached", torch.device("cpu"),
                    progress=False)
    assert Counting.calls == {2 << 30: 2, 3 * H * W * 4 * 4: 3, 0: 4}[cache_bytes]
    plain = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    cached = sorted(p.relative_to(tmp_path / "cached") for p in (tmp_path / "cached").rglob("*") if p.is_file())
    assert plain == cached and len(plain) > 3
    for rel in plain:
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "cached" / rel).read_bytes(), rel


def test_flip_averages_the_softmax_of_the_image_and_of_its_mirror(tmp_path: Path) -> None:
    """`flip: true` (the released CRST): the policy sees log((softmax(f(x)) + mirror(softmax(f(mirror x)))) / 2),
    here with a model that is not mirror-symmetric (a ramp across the width added to each class's logit)."""
    ramp = torch.arange(W, dtype=torch.float32) * torch.tensor([0.0, 1.0, -1.0])[:, None]  # [3 classes, W]

    class Ramp(Stub):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {LOGITS: self.k * x + ramp[None, :, None, :]}

    seen: list[torch.Tensor] = []

    @register_policy(NoOptions)
    class Recording(Policy):
        name = "recording_test_policy"

        def observe(self, names: list[str], logits: torch.Tensor) -> None:
            seen.append(logits.clone())

        def select(self) -> Selection:
            return Selection(labelled=[], unlabelled=["img0", "img1"])

    try:
        reader = FakeReader(PIXELS[:2])
        for flip in (False, True):
            seen.clear()
            cfg = PseudoSetConfig(policy="recording_test_policy", batch_size=2, flip=flip)
            make_pseudo_set(Ramp(k=1.0), reader, RAW, cfg, tmp_path / f"flip{flip}", torch.device("cpu"),
                            progress=False)
            x = torch.stack([torch.tensor(p, dtype=torch.float32)[:, None, None].expand(3, H, W) / 255
                             for p in PIXELS[:2]])
            plain = x + ramp[None, :, None, :]
            if not flip:
                torch.testing.assert_close(seen[0], plain)
                continue
            mirrored = (x.flip(-1) + ramp[None, :, None, :]).flip(-1)
            expected = ((plain.softmax(1) + mirrored.softmax(1)) / 2).log()
            torch.testing.assert_close(seen[0], expected)
            assert not torch.allclose(seen[0].softmax(1), plain.softmax(1))  # the mirror did change it
    finally:
        POLICIES.pop("recording_test_policy", None)
