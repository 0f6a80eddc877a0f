"""Rare class sampling (plca.data.rcs; spec mean-teacher.md, "Rare class sampling")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from plca.data.datasets import Sample
from plca.data.rcs import RareClassSampler, RCSConfig, RCSDataset, class_pixel_counts, rcs_probabilities
from plca.engine.streams import KeyedDataset


class FakeReader:
    """Items of [H, W] labels; the image's pixels hold the item's index (to see which item was read)."""

    def __init__(self, labels: list[np.ndarray]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> Sample:
        label = self.labels[index]
        image = np.full((*label.shape, 3), index, dtype=np.uint8)
        return Sample(image=image, label=label.astype(np.uint8), name=f"item{index}")


# ---- probabilities -------------------------------------------------------------------------------------------


def test_rcs_probabilities_against_a_hand_softmax() -> None:
    counts = {3: 800, 0: 100, 2: 50, 1: 50}
    classes, probs = rcs_probabilities(counts, temperature=0.1)
    assert classes == [1, 2, 0, 3]  # ascending count, ties by id
    assert probs.dtype == torch.float32 and probs.shape == (4,)
    n = np.array([counts[c] for c in classes], dtype=np.float64)
    logits = (1 - n / n.sum()) / 0.1
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    assert np.allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    assert probs[0] == probs[1] and probs[1] > probs[2] > probs[3]
    # the default T = 0.01 is sharp: the rarest classes take almost everything
    _, sharp = rcs_probabilities(counts)
    assert float(sharp[:2].sum()) > 0.99


def test_rcs_probabilities_validation_and_package_export() -> None:
    import plca.data

    assert plca.data.rcs_probabilities is rcs_probabilities
    assert "rcs_probabilities" in plca.data.__all__
    with pytest.raises(ValueError, match="temperature"):
        rcs_probabilities({0: 1}, temperature=0)
    with pytest.raises(ValueError, match="no class"):
        rcs_probabilities({})
    with pytest.raises(ValueError, match="negative"):
        rcs_probabilities({0: 5, 1: -1})


def test_class_pixel_counts_on_a_fake_reader() -> None:
    labels = [
        np.array([[0, 0, 1], [255, 255, 1]]),
        np.array([[18, 255, 255], [255, 255, 255]]),
        np.full((2, 3), 255),
    ]
    counts = class_pixel_counts(FakeReader(labels))
    assert counts == [{0: 2, 1: 2}, {18: 1}, {}]
    # what a stage stores as JSON (string keys) is read back by the sampler
    stored = json.loads(json.dumps(counts))
    assert RareClassSampler(stored, RCSConfig(min_pixels=0)).totals == {0: 2, 1: 2, 18: 1}
    with pytest.raises(ValueError, match="item1"):
        class_pixel_counts(FakeReader([labels[0], np.array([[19, 0]])]))


def test_rcs_config_validation() -> None:
    for bad in ({"temperature": 0}, {"min_pixels": -1}, {"min_crop_pixels": -1}, {"max_tries": -1},
                {"max_tries": 1.5}):
        with pytest.raises(ValueError, match="RCSConfig"):
            RCSConfig(**bad)


# ---- the sampler ---------------------------------------------------------------------------------------------

COUNTS = [{0: 5000, 1: 400}, {0: 6000, 2: 3500}, {1: 3200, 2: 100}, {3: 10}, {1: 3001}]


def test_sampler_draws_only_qualifying_images_and_drops_empty_classes() -> None:
    sampler = RareClassSampler(COUNTS, RCSConfig(temperature=0.5))
    assert sampler.dropped == [3]  # 10 pixels in one image: no image qualifies
    assert set(sampler.classes) == {0, 1, 2}
    qualifying = {0: {0, 1}, 1: {2, 4}, 2: {1}}
    rng = np.random.default_rng(0)
    for _ in range(2000):
        c, i = sampler.draw(rng)
        assert i in qualifying[c]
    with pytest.raises(ValueError, match="no image"):
        RareClassSampler([{0: 10}, {1: 3000}])  # 3000 is not more than 3000


def test_sampler_frequencies_approach_p() -> None:
    sampler = RareClassSampler(COUNTS, RCSConfig(temperature=0.5))
    classes, probs = rcs_probabilities({0: 11000, 1: 6601, 2: 3600, 3: 10}, 0.5)
    keep = [j for j, c in enumerate(classes) if c != 3]
    expected = {classes[j]: float(probs[j]) / float(probs[keep].sum()) for j in keep}
    assert sampler.classes == [c for c in classes if c != 3]
    assert np.allclose(sampler.probabilities, [expected[c] for c in sampler.classes], rtol=1e-6)
    rng = np.random.default_rng(1)
    draws = [sampler.draw(rng) for _ in range(20000)]
    for c, p in expected.items():
        assert abs(sum(d[0] == c for d in draws) / len(draws) - p) < 0.015
    images_of_0 = [i for c, i in draws if c == 0]
    assert abs(np.mean(np.array(images_of_0) == 0) - 0.5) < 0.05  # uniform among qualifying images


# ---- the dataset ---------------------------------------------------------------------------------------------


def _corner_labels() -> list[np.ndarray]:
    """32 x 32 labels of class 0; class 5 fills the top-left 8 x 8 corner of items 1 and 3 (64 pixels) and only
    two pixels of items 0 and 2."""
    labels = []
    for i in range(4):
        label = np.zeros((32, 32), dtype=np.uint8)
        if i % 2:
            label[:8, :8] = 5
        else:
            label[0, :2] = 5
        labels.append(label)
    return labels


class CropTransform:
    """A 16 x 16 crop at one of the four quadrants, drawn from the rng; records the class-5 pixels of each crop."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, sample: Sample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y0, x0 = (int(v) * 16 for v in rng.integers(0, 2, size=2))
        label = sample.label[y0:y0 + 16, x0:x0 + 16].astype(np.int64)
        image = sample.image[y0:y0 + 16, x0:x0 + 16].transpose(2, 0, 1).astype(np.float32)
        self.calls.append(int((label == 5).sum()))
        return image, label


def _dataset(max_tries: int = 10) -> tuple[RCSDataset, CropTransform]:
    reader = FakeReader(_corner_labels())
    config = RCSConfig(min_pixels=10, min_crop_pixels=20, max_tries=max_tries)
    sampler = RareClassSampler(class_pixel_counts(reader), config)
    transform = CropTransform()
    return RCSDataset(reader, transform, seed=3, stream_id=0, sampler=sampler), transform


def test_rcs_dataset_is_a_keyed_dataset_and_deterministic() -> None:
    ds, _ = _dataset()
    assert isinstance(ds, KeyedDataset) and len(ds) == 4
    assert ds.sampler.probabilities[ds.sampler.classes.index(5)] > 0.999
    first = [ds[(0, k)] for k in range(12)]
    again, _ = _dataset()
    for k, item in enumerate(first):
        assert set(item) == {"image", "label"}
        assert item["label"].dtype == torch.int64 and item["image"].dtype == torch.float32
        other = again[(0, k)]
        assert torch.equal(item["image"], other["image"]) and torch.equal(item["label"], other["label"])
        # the key's index is ignored
        moved = ds[(3, k)]
        assert torch.equal(item["image"], moved["image"]) and torch.equal(item["label"], moved["label"])
    # only qualifying images (items 1 and 3) are read for class 5, and both are
    assert {int(item["image"][0, 0, 0]) for item in first} == {1, 3}


def test_rcs_dataset_recrops_until_the_crop_holds_the_class() -> None:
    ds, transform = _dataset()
    recropped = 0
    for k in range(40):
        transform.calls.clear()
        item = ds[(0, k)]
        held = int((item["label"] == 5).sum())
        calls = transform.calls
        assert held == calls[-1]
        assert all(n <= 20 for n in calls[:-1])  # every earlier crop failed the check
        assert len(calls) <= 11  # 10 checks: at most 11 crops, the last one kept unchecked
        if held <= 20:
            assert len(calls) == 11
        recropped += len(calls) > 1 and held > 20
    assert recropped > 5
    # max_tries = 0: a single crop, never redone
    ds0, transform0 = _dataset(max_tries=0)
    for k in range(10):
        transform0.calls.clear()
        ds0[(0, k)]
        assert len(transform0.calls) == 1


def test_rcs_dataset_draws_from_the_keyed_rng() -> None:
    ds, _ = _dataset()
    for k in range(5):
        rng = np.random.default_rng([3, 0, k])
        c, index = ds.sampler.draw(rng)
        assert c == 5
        assert int(ds[(0, k)]["image"][0, 0, 0]) == index
