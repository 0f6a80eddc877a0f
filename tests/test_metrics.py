import json

import numpy as np
import pytest
import torch

from plca.data.labels import CLASS_NAMES, IGNORE_INDEX, PROTOCOLS
from plca.evaluation.metrics import ConfusionMatrix, _bincount_numpy, _bincount_torch, iou, miou, summarize

ROAD, SIDEWALK, WALL, TERRAIN = 0, 1, 3, 9
OTHER = 255  # a prediction with no train id

# A tiny case whose IoUs are worked out by hand below, per protocol.
HAND_GT = np.array([ROAD] * 5 + [SIDEWALK] * 2 + [TERRAIN] * 2 + [WALL] * 2 + [IGNORE_INDEX])
HAND_PRED = np.array([ROAD, ROAD, ROAD, TERRAIN, OTHER, SIDEWALK, ROAD, ROAD, ROAD, WALL, SIDEWALK, ROAD])


def reference_iou(pred: np.ndarray, gt: np.ndarray, classes) -> np.ndarray:
    """Pixel-by-pixel definition, independent of the matrix code."""
    keep = np.isin(gt, classes)  # gt of non-evaluated classes and ignore do not count
    out = []
    for c in classes:
        tp = np.sum((gt == c) & (pred == c))
        fn = np.sum((gt == c) & (pred != c))
        fp = np.sum(keep & (gt != c) & (pred == c))
        out.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
    return np.array(out)


def test_update_counts_ignore_and_other_column():
    cm = ConfusionMatrix(num_classes=3)
    gt = np.array([[0, 0, 1, 2], [2, 255, 1, 0]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 255], [7, 0, 2, -1]], dtype=np.int16)
    cm.update(pred, gt)
    expected = np.zeros((3, 4), dtype=np.int64)
    expected[0, 0] += 1
    expected[0, 1] += 1
    expected[1, 1] += 1
    expected[2, 3] += 1  # 255 -> other
    expected[2, 3] += 1  # 7 is outside 0..2 -> other
    expected[1, 2] += 1
    expected[0, 3] += 1  # -1 -> other; the gt-255 pixel is skipped
    np.testing.assert_array_equal(cm.counts, expected)
    assert cm.pixels == 7


def test_torch_and_numpy_agree_and_accumulate():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 19, size=(2, 8, 16))
    gt[:, :2] = IGNORE_INDEX
    pred = rng.integers(0, 22, size=(2, 8, 16))
    a, b = ConfusionMatrix(), ConfusionMatrix()
    a.update(pred, gt)
    a.update(pred[:1], gt[:1])
    b.update(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8))
    b.update(torch.from_numpy(pred[:1]), gt[:1])  # mixed inputs work too
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.pixels == 3 * 6 * 16


def test_device_path_matches_numpy_path():
    # the torch path serves tensors on an accelerator; here it runs on CPU tensors to check it counts the same
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 19, size=(4, 8, 16))
    gt[:, :3] = IGNORE_INDEX
    pred = rng.integers(-2, 30, size=(4, 8, 16))
    expected = _bincount_numpy(pred, gt, 19)
    np.testing.assert_array_equal(_bincount_torch(torch.from_numpy(pred), torch.from_numpy(gt), 19), expected)
    assert expected[:, 19].sum() == np.sum(((pred < 0) | (pred >= 19)) & (gt != IGNORE_INDEX))
    with pytest.raises(ValueError, match="outside 0..18"):
        _bincount_torch(torch.tensor([0, 1]), torch.tensor([0, 19]), 19)


def test_update_leaves_inputs_untouched():
    gt = np.array([0, 255, 3, 1], dtype=np.int64)
    pred = np.array([-1, 300, 3, 1], dtype=np.int64)
    ConfusionMatrix().update(pred, gt)
    np.testing.assert_array_equal(gt, [0, 255, 3, 1])
    np.testing.assert_array_equal(pred, [-1, 300, 3, 1])


@pytest.mark.parametrize(
    "pred, gt, err, match",
    [
        (np.zeros((2, 3), int), np.zeros((3, 2), int), ValueError, "shape"),
        (np.zeros(4, int), np.array([0, 1, 19, 255]), ValueError, "outside 0..18"),
        (np.zeros(4, int), np.array([0, -1, 2, 3]), ValueError, "outside 0..18"),
        (np.zeros(4), np.zeros(4, int), TypeError, "integer"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), TypeError, "integer"),
        (torch.zeros(4, dtype=torch.long), torch.tensor([0, 19, 0, 0]), ValueError, "outside 0..18"),
    ],
)
def test_update_rejects_bad_input(pred, gt, err, match):
    with pytest.raises(err, match=match):
        ConfusionMatrix().update(pred, gt)


def test_iou_hand_case_per_protocol():
    cm = ConfusionMatrix()
    cm.update(HAND_PRED, HAND_GT)
    # 19: road tp 3, fn 2 (terrain, other), fp 3 (1 on sidewalk, 2 on terrain); sidewalk tp 1 fn 1 fp 1 (on
    # wall); terrain tp 0 fn 2 fp 1; wall tp 1 fn 1 fp 0; every other class never occurs.
    got = iou(cm, PROTOCOLS[19])
    expected = {ROAD: 3 / 8, SIDEWALK: 1 / 3, TERRAIN: 0.0, WALL: 1 / 2}
    for c in range(19):
        if c in expected:
            assert got[c] == pytest.approx(expected[c])
        else:
            assert np.isnan(got[c])
    assert miou(cm, PROTOCOLS[19]) == pytest.approx(np.mean(list(expected.values())))
    # 16: terrain ground truth is ignored, so road loses its 2 fp there (the terrain prediction stays a miss).
    got16 = dict(zip(PROTOCOLS[16], iou(cm, PROTOCOLS[16]), strict=True))
    assert got16[ROAD] == pytest.approx(3 / 6)
    assert got16[SIDEWALK] == pytest.approx(1 / 3)
    assert got16[WALL] == pytest.approx(1 / 2)
    assert miou(cm, PROTOCOLS[16]) == pytest.approx(np.mean([3 / 6, 1 / 3, 1 / 2]))
    # 13: wall ground truth is ignored too, so sidewalk loses its fp there.
    got13 = dict(zip(PROTOCOLS[13], iou(cm, PROTOCOLS[13]), strict=True))
    assert got13[SIDEWALK] == pytest.approx(1 / 2)
    assert miou(cm, PROTOCOLS[13]) == pytest.approx(np.mean([3 / 6, 1 / 2]))


@pytest.mark.parametrize("protocol", [19, 16, 13])
def test_iou_matches_pixelwise_definition_on_random_data(protocol):
    rng = np.random.default_rng(protocol)
    gt = rng.integers(0, 19, size=4000)
    gt[rng.random(4000) < 0.1] = IGNORE_INDEX
    gt[gt == 16] = 15  # "train" neither in gt nor predicted: its IoU must be nan
    pred = np.where(rng.random(4000) < 0.6, gt, rng.integers(0, 25, size=4000))
    pred[gt == IGNORE_INDEX] = rng.integers(0, 19, size=int((gt == IGNORE_INDEX).sum()))
    pred[pred == 16] = 17
    cm = ConfusionMatrix()
    cm.update(pred, gt)
    classes = PROTOCOLS[protocol]
    ref = reference_iou(pred, gt, classes)
    np.testing.assert_allclose(iou(cm, classes), ref, rtol=0, atol=1e-12, equal_nan=True)
    assert miou(cm, classes) == pytest.approx(np.nanmean(ref), abs=1e-12)
    if 16 in classes:
        assert np.isnan(iou(cm, classes)[classes.index(16)])


def test_iou_accepts_arrays_and_rejects_bad_classes():
    cm = ConfusionMatrix()
    cm.update(HAND_PRED, HAND_GT)
    np.testing.assert_array_equal(iou(cm.counts), cm.iou())
    assert np.isnan(miou(ConfusionMatrix()))
    with pytest.raises(ValueError, match="outside"):
        iou(cm, [0, 19])
    with pytest.raises(ValueError, match="distinct"):
        iou(cm, [0, 0])
    with pytest.raises(ValueError, match="shape"):
        iou(np.zeros((3, 5), dtype=np.int64))


def test_summarize_is_json_friendly_percent():
    cm = ConfusionMatrix()
    cm.update(HAND_PRED, HAND_GT)
    s = summarize(cm)
    json.dumps(s, allow_nan=False)  # nan became None
    assert s["pixels"] == 11
    assert s["mIoU"]["19"] == pytest.approx(100 * np.mean([3 / 8, 1 / 3, 0.0, 1 / 2]))
    assert s["mIoU"]["13"] == pytest.approx(100 * np.mean([3 / 6, 1 / 2]))
    assert list(s["IoU"]["19"]) == list(CLASS_NAMES)
    assert list(s["IoU"]["16"]) == [CLASS_NAMES[c] for c in PROTOCOLS[16]]
    assert s["IoU"]["19"]["road"] == pytest.approx(37.5)
    assert s["IoU"]["16"]["road"] == pytest.approx(50.0)
    assert s["IoU"]["19"]["car"] is None
    assert "terrain" not in s["IoU"]["16"]
    with pytest.raises(ValueError, match="19-class"):
        summarize(ConfusionMatrix(num_classes=3))
    with pytest.raises(ValueError, match="unknown protocols"):
        summarize(cm, protocols=(19, 7))


def test_merge_add_and_sum_equal_one_pass():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 19, size=(3, 8, 16))
    pred = rng.integers(0, 19, size=(3, 8, 16))
    whole = ConfusionMatrix()
    whole.update(pred, gt)
    parts = []
    for i in range(3):
        part = ConfusionMatrix()
        part.update(pred[i], gt[i])
        parts.append(part)
    assert parts[0].merge(parts[1]).merge(parts[2]) == whole
    assert parts[0] + parts[1] + parts[2] == whole
    assert sum(parts) == whole
    assert parts[0] + parts[1] != whole
    before = parts[0].counts.copy()
    _ = parts[0] + parts[1]
    np.testing.assert_array_equal(parts[0].counts, before)  # merging does not mutate
    with pytest.raises(ValueError, match="3 and 19"):
        ConfusionMatrix(3) + whole
    with pytest.raises(TypeError):
        whole.merge(whole.counts)


def test_save_load_round_trip_and_errors(tmp_path):
    cm = ConfusionMatrix()
    cm.update(HAND_PRED, HAND_GT)
    path = tmp_path / "cm.npy"
    cm.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.npy"]  # no temp file left behind
    loaded = ConfusionMatrix.load(path)
    assert loaded == cm and loaded.num_classes == 19
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((19, 19), dtype=np.int64))
    with pytest.raises(ValueError, match=r"bad\.npy.*shape"):
        ConfusionMatrix.load(bad)
    np.save(bad, np.full((19, 20), -1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"bad\.npy.*non-negative"):
        ConfusionMatrix.load(bad)
    bad.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"bad\.npy.*cannot read"):
        ConfusionMatrix.load(bad)
