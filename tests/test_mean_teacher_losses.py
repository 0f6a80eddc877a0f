"""DACS / DAFormer mean-teacher losses: pseudo-label weight, all-pixel CE, ImageNet feature distance."""

from __future__ import annotations

import math

import pytest
import torch

from plca.losses import (
    THING_CLASSES,
    cross_entropy,
    downscale_label_ratio,
    feature_distance,
    pseudo_label_weight,
    weighted_pixel_ce,
)

F64 = torch.float64


def test_thing_classes_are_daformers() -> None:
    assert THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def _two_class_logits(margins: list[list[float]], winner: list[list[int]]) -> torch.Tensor:
    """[B=2, C=2, H=4, W=1] logits: pixel (b, i) has logit `margin` on class `winner` and 0 on the other, so its
    max probability is sigmoid(margin)."""
    logits = torch.zeros(2, 2, 4, 1, dtype=F64)
    for b in range(2):
        for i in range(4):
            logits[b, winner[b][i], i, 0] = margins[b][i]
    return logits


def test_pseudo_label_weight_is_the_batch_fraction_of_confident_pixels() -> None:
    # sigmoid(5) = 0.9933 >= 0.968 > sigmoid(1) = 0.731: 3 confident pixels of 8.
    margins = [[5.0, 1.0, 1.0, 5.0], [1.0, 1.0, 5.0, 1.0]]
    winner = [[0, 1, 1, 0], [1, 0, 1, 1]]
    logits = _two_class_logits(margins, winner)
    labels, weight = pseudo_label_weight(logits)
    assert labels.dtype == torch.int64 and weight.dtype == torch.float32
    assert labels.shape == weight.shape == (2, 4, 1)
    assert labels[..., 0].tolist() == winner
    assert torch.equal(weight, torch.full((2, 4, 1), 0.375, dtype=torch.float32))


def test_pseudo_label_weight_border_rows_and_scale() -> None:
    margins = [[5.0, 1.0, 1.0, 5.0], [1.0, 1.0, 5.0, 1.0]]
    logits = _two_class_logits(margins, [[0] * 4, [0] * 4])
    _, weight = pseudo_label_weight(logits, ignore_top=1, ignore_bottom=1, scale=0.8)
    q = 0.375 * 0.8
    expected = torch.tensor([[0.0, q, q, 0.0]] * 2, dtype=torch.float32)[..., None]
    assert torch.allclose(weight, expected, rtol=0, atol=1e-7)
    # The border rows are cropped after q: q still counts the confident pixels of rows 0 and 3.
    _, top_only = pseudo_label_weight(logits, ignore_top=2)
    assert top_only[:, :2].eq(0).all() and torch.allclose(top_only[:, 2:], torch.tensor(0.375))
    _, bottom_only = pseudo_label_weight(logits, ignore_bottom=3)
    assert bottom_only[:, 1:].eq(0).all() and torch.allclose(bottom_only[:, :1], torch.tensor(0.375))


def test_pseudo_label_weight_threshold_is_inclusive_and_gradient_free() -> None:
    logits = torch.zeros(1, 2, 2, 3, dtype=F64, requires_grad=True)  # p = 0.5 exactly everywhere
    labels, weight = pseudo_label_weight(logits, threshold=0.5)
    assert torch.equal(weight, torch.ones(1, 2, 3))
    assert not weight.requires_grad and not labels.requires_grad
    _, weight = pseudo_label_weight(logits, threshold=0.5 + 1e-9)
    assert torch.equal(weight, torch.zeros(1, 2, 3))


def test_pseudo_label_weight_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="teacher_logits"):
        pseudo_label_weight(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="ignore_top"):
        pseudo_label_weight(torch.zeros(1, 2, 3, 4), ignore_top=-1)


def _ce(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_weighted_pixel_ce_counts_ignored_pixels_in_the_divisor() -> None:
    rows = [[1.0, -2.0, 0.5], [0.3, 0.2, 0.1], [-1.0, 2.0, 3.0]]
    logits = torch.tensor(rows, dtype=F64).T.reshape(1, 3, 1, 3).clone().requires_grad_(True)
    labels = torch.tensor([[[0, 255, 2]]])
    loss = weighted_pixel_ce(logits, labels)
    expected = (_ce(rows[0], 0) + _ce(rows[2], 2)) / 3
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # plca's cross_entropy divides by the 2 labelled pixels instead.
    assert cross_entropy(logits, labels).item() == pytest.approx(expected * 3 / 2, rel=1e-12)
    loss.backward()
    assert logits.grad[..., 1].abs().max().item() == 0.0
    # [B, 1, H, W] labels are squeezed.
    assert weighted_pixel_ce(logits, labels[:, None]).item() == pytest.approx(expected, rel=1e-12)


def test_weighted_pixel_ce_multiplies_the_weight_before_the_mean() -> None:
    rows = [[1.0, -2.0, 0.5], [0.3, 0.2, 0.1], [-1.0, 2.0, 3.0], [0.0, 0.0, 4.0]]
    logits = torch.tensor(rows, dtype=F64).T.reshape(1, 3, 2, 2)
    labels = torch.tensor([[[0, 255], [1, 2]]])
    weight = torch.tensor([[[0.5, 9.0], [2.0, 0.0]]], dtype=torch.float32)
    loss = weighted_pixel_ce(logits, labels, weight)
    expected = (0.5 * _ce(rows[0], 0) + 2.0 * _ce(rows[2], 1)) / 4
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, rel=1e-7)
    assert weighted_pixel_ce(logits, labels, weight[:, None]).item() == pytest.approx(expected, rel=1e-7)


def test_weighted_pixel_ce_rejects_bad_labels() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        weighted_pixel_ce(logits, torch.tensor([[[0, 3], [1, 2]]]))
    with pytest.raises(ValueError, match="labels"):
        weighted_pixel_ce(logits, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        weighted_pixel_ce(logits, torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 3))


HAND_LABELS = [
    [1, 1, 3, 3],
    [1, 2, 4, 4],  # cell (0,0): class 1 at 3/4 = 0.75; cell (0,1): 3 and 4 at 2/4 each
    [255, 255, 7, 7],
    [255, 5, 7, 7],  # cell (1,0): 255 at 3/4 (the extra class wins); cell (1,1): 7 at 4/4
]


def test_downscale_label_ratio_hand_case() -> None:
    labels = torch.tensor(HAND_LABELS)[None, None]
    out = downscale_label_ratio(labels, 2, 0.75, 19)
    assert out.dtype == torch.int64 and out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[1, 255], [255, 7]]
    assert downscale_label_ratio(labels, 2, 0.8, 19)[0, 0].tolist() == [[255, 255], [255, 7]]
    assert downscale_label_ratio(labels, 2, 0.5, 19)[0, 0, 0, 0].item() == 1
    # [B, H, W] input, a whole-image cell, and the input left untouched.
    assert downscale_label_ratio(labels[:, 0], 4, 0.25, 19)[0, 0].tolist() == [[7]]
    assert labels[0, 0, 2, 0].item() == 255


def test_downscale_label_ratio_rejects_indivisible_sizes_and_bad_labels() -> None:
    with pytest.raises(ValueError, match="divisible"):
        downscale_label_ratio(torch.zeros(1, 1, 6, 8, dtype=torch.long), 4, 0.75, 19)
    with pytest.raises(ValueError, match="outside"):
        downscale_label_ratio(torch.full((1, 1, 2, 2), 19), 2, 0.75, 19)


def _fd_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels [1, 1, 4, 4] -> 2 x 2 cells: (0,0) car (13, kept), (0,1) road (0, stuff), (1,0) bicycle at 3/4 with
    one 255 (18, kept), (1,1) person / rider 2/4 each (255). Feature differences: 5 and 3 at the kept cells."""
    labels = torch.tensor([
        [13, 13, 0, 0],
        [13, 13, 0, 0],
        [18, 18, 11, 11],
        [18, 255, 12, 12],
    ])[None, None]
    feat_imnet = torch.randn(1, 3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    diff = torch.full((1, 3, 2, 2), 100.0, dtype=F64)
    diff[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])
    diff[0, :, 1, 0] = torch.tensor([1.0, -2.0, 2.0])
    return feat_imnet + diff, feat_imnet, labels


def test_feature_distance_is_the_mean_l2_distance_over_kept_thing_cells() -> None:
    feat, feat_imnet, labels = _fd_case()
    feat.requires_grad_(True)
    feat_imnet.requires_grad_(True)
    loss = feature_distance(feat, feat_imnet, labels)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx((5.0 + 3.0) / 2, rel=1e-12)
    loss.backward()
    assert feat_imnet.grad is None
    expected = torch.zeros_like(feat)
    expected[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0], dtype=F64) / 5 / 2
    expected[0, :, 1, 0] = torch.tensor([1.0, -2.0, 2.0], dtype=F64) / 3 / 2
    assert torch.allclose(feat.grad, expected, rtol=0, atol=1e-12)
    # [B, H, W] labels; another class list keeps the road cell too.
    assert feature_distance(feat, feat_imnet, labels[:, 0]).item() == pytest.approx(4.0, rel=1e-12)
    assert feature_distance(feat, feat_imnet, labels, classes=(0, 13)).item() == pytest.approx(
        (5.0 + 100 * math.sqrt(3)) / 2, rel=1e-12)


def test_feature_distance_empty_selection_is_zero_with_zero_gradient() -> None:
    feat, feat_imnet, _ = _fd_case()
    feat.requires_grad_(True)
    stuff = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    loss = feature_distance(feat, feat_imnet, stuff)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(feat.grad, torch.zeros_like(feat))


def test_feature_distance_identical_features_have_a_finite_gradient() -> None:
    _, feat_imnet, labels = _fd_case()
    feat = feat_imnet.clone().requires_grad_(True)
    loss = feature_distance(feat, feat_imnet, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(feat.grad).all()


def test_feature_distance_scale_factor_follows_the_width() -> None:
    # A 64 x 128 crop with stride-32 features (2 x 4 cells of 32 x 32 pixels): only cell (1, 2) is a car.
    labels = torch.zeros(1, 1, 64, 128, dtype=torch.long)
    labels[..., 32:, 64:96] = 13
    feat = torch.zeros(1, 2, 2, 4, dtype=F64)
    feat[0, :, 1, 2] = torch.tensor([6.0, 8.0])
    assert feature_distance(feat, torch.zeros_like(feat), labels).item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="downscaled"):
        feature_distance(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), labels)
    with pytest.raises(ValueError, match="feat_imnet"):
        feature_distance(feat, torch.zeros(1, 2, 2, 2), labels)
