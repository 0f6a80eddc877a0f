"""PGPC's pixel contrast: its inputs and CLUDA's loss in the released and the aligned row order."""

from __future__ import annotations

import math

import pytest
import torch

from plca.losses import THING_CLASSES, contrast_inputs, pixel_contrast_loss

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# contrast_inputs


def test_contrast_inputs_shapes_and_feature_resampling() -> None:
    ramp = torch.arange(8, dtype=F64).expand(2, 2, 8, 8)  # value = column index
    stages = [
        ramp,
        torch.full((2, 3, 4, 4), 2.0, dtype=F64),
        torch.full((2, 4, 2, 2), -1.0, dtype=F64),
        torch.full((2, 5, 1, 1), 7.0, dtype=F64),
    ]
    feats, labels, weight = contrast_inputs(stages, torch.zeros(2, 1, 32, 32, dtype=torch.long), size=(5, 5))
    assert feats.shape == (2, 14, 5, 5) and feats.dtype == F64
    assert labels.shape == (2, 1, 5, 5) and labels.dtype == torch.int64
    assert weight is None
    # align_corners=True from 8 to 5 columns samples columns 0, 1.75, 3.5, 5.25, 7.
    assert torch.allclose(feats[:, :2], torch.tensor([0.0, 1.75, 3.5, 5.25, 7.0], dtype=F64).expand(2, 2, 5, 5))
    assert torch.equal(feats[:, 2:5], torch.full((2, 3, 5, 5), 2.0, dtype=F64))
    assert torch.equal(feats[:, 5:9], torch.full((2, 4, 5, 5), -1.0, dtype=F64))
    assert torch.equal(feats[:, 9:], torch.full((2, 5, 5, 5), 7.0, dtype=F64))


def test_contrast_inputs_stage_resize_is_bilinear_without_corner_alignment() -> None:
    # A 2-column stage upsampled to 4 columns with align_corners=False: 0, 0.25, 0.75, 1 (edges clamp), then the
    # identity resize (4 -> 4 with align_corners=True).
    first = torch.zeros(1, 1, 4, 4, dtype=F64)
    second = torch.tensor([0.0, 1.0], dtype=F64).expand(1, 1, 2, 2)
    feats, _, _ = contrast_inputs([first, second], torch.zeros(1, 1, 4, 4, dtype=torch.long), size=(4, 4))
    assert torch.allclose(feats[0, 1], torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=F64).expand(4, 4))


def test_contrast_inputs_labels_nearest_and_weight_bilinear() -> None:
    labels = (torch.arange(16).reshape(1, 1, 4, 4) * 4) % 256  # distinct values, 252 and the like kept
    labels[0, 0, 0, 0] = 255
    stages = [torch.zeros(1, 1, 4, 4)]
    _, down, _ = contrast_inputs(stages, labels, size=(2, 2))
    # nearest: source index floor(dst * 4 / 2) = 0, 2
    assert down[0, 0].tolist() == [[255, 8], [32, 40]]
    _, down3, _ = contrast_inputs(stages, labels[:, 0], size=(3, 3))  # [B, H, W] labels too
    assert down3[0, 0].tolist() == [[255, 4, 8], [16, 20, 24], [32, 36, 40]]

    weight = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(1, 4, 4)  # [B, H, W], value = column index
    _, _, w = contrast_inputs(stages, labels, weight, size=(3, 3))
    assert w.shape == (1, 1, 3, 3)
    assert torch.allclose(w[0, 0], torch.tensor([0.0, 1.5, 3.0]).expand(3, 3))


def test_contrast_inputs_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        contrast_inputs([], torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        contrast_inputs([torch.zeros(1, 1, 4, 4)], torch.zeros(1, 2, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# pixel_contrast_loss: an independent reference, loops over the spec's formula


def reference_loss(feats: list, labels: list, weights: list | None, pair_order: str) -> float:
    """feats[b][p] = list of C floats, labels[b][p], weights[b][p] (p = flat pixel index of image b).

    Labels and weights: row r = image r // P, pixel r % P. Feature rows: released, row r = pixel r // B of image
    r % B; aligned, as the labels.
    """
    batch, pixels = len(feats), len(feats[0])
    n = batch * pixels

    def unit(v: list) -> list:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    z, y, w = [], [], []
    for r in range(n):
        b, p = (r % batch, r // batch) if pair_order == "released" else (r // pixels, r % pixels)
        z.append(unit(feats[b][p]))
        y.append(labels[r // pixels][r % pixels])
        w.append(1.0 if weights is None else weights[r // pixels][r % pixels])

    def s(i: int, j: int) -> float:
        return sum(a * c for a, c in zip(z[i], z[j], strict=True))

    total = 0.0
    for r in range(n):
        positives = [k for k in range(n) if k != r and y[k] == y[r]]
        negatives = [k for k in range(n) if y[k] != y[r]]
        neg_sum = sum(math.exp(s(r, k)) for k in negatives)
        row = 0.0
        for k in positives:
            row += (s(r, k) - math.log(math.exp(s(r, k)) + neg_sum)) * w[r] * w[k]
        total += row / max(len(positives), 1)
    return -total / n


def to_tensors(feats: list, labels: list, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, channels = len(feats), len(feats[0][0])
    f = torch.tensor(feats, dtype=F64).reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
    return f, torch.tensor(labels).reshape(batch, 1, height, width)


# B = 2 images of 1 x 2 pixels, C = 2. Released feature rows: (img0 px0, img1 px0, img0 px1, img1 px1); label
# rows: (img0 px0, img0 px1, img1 px0, img1 px1) -- rows 1 and 2 swap, so the orders give different values.
TWO_FEATS = [[[1.0, 0.0], [0.6, 0.8]], [[-0.5, 1.0], [2.0, -1.0]]]
TWO_LABELS = [[0, 0], [1, 0]]
TWO_WEIGHTS = [[0.5, 1.0], [0.25, 2.0]]


def test_closed_form_single_image() -> None:
    # z = (1,0), (0,1), (1,0); labels 0, 0, 1. Row 0: l_01 = 0 - log(e^0 + e^1); row 1: l_10 = 0 - log(e^0 + e^0);
    # row 2 has no positive. L = (log(1 + e) + log 2) / 3.
    feats = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]], dtype=F64).T.reshape(1, 2, 1, 3)
    labels = torch.tensor([0, 0, 1]).reshape(1, 1, 1, 3)
    expected = (math.log(1 + math.e) + math.log(2)) / 3
    for order in ("released", "aligned"):
        assert pixel_contrast_loss(feats, labels, pair_order=order).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("order", ["released", "aligned"])
@pytest.mark.parametrize("weighted", [False, True])
def test_two_images_match_the_reference(order: str, weighted: bool) -> None:
    feats, labels = to_tensors(TWO_FEATS, TWO_LABELS, 1, 2)
    weights = TWO_WEIGHTS if weighted else None
    weight = torch.tensor(TWO_WEIGHTS, dtype=F64).reshape(2, 1, 1, 2) if weighted else None
    loss = pixel_contrast_loss(feats, labels, weight, pair_order=order)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(reference_loss(TWO_FEATS, TWO_LABELS, weights, order), rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_two_images_orders_differ(weighted: bool) -> None:
    feats, labels = to_tensors(TWO_FEATS, TWO_LABELS, 1, 2)
    weight = torch.tensor(TWO_WEIGHTS, dtype=F64).reshape(2, 1, 1, 2) if weighted else None
    released = pixel_contrast_loss(feats, labels, weight, pair_order="released").item()
    aligned = pixel_contrast_loss(feats, labels, weight, pair_order="aligned").item()
    assert abs(released - aligned) > 1e-3


def test_random_case_with_255_matches_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    batch, height, width, channels = 2, 2, 3, 3
    feats = torch.randn(batch, height * width, channels, generator=gen, dtype=F64).tolist()
    choices = [0, 4, 255]
    labels = [[choices[int(i)] for i in torch.randint(0, 3, (height * width,), generator=gen)] for _ in range(batch)]
    weights = torch.rand(batch, height * width, generator=gen, dtype=F64).tolist()
    f, y = to_tensors(feats, labels, height, width)
    w = torch.tensor(weights, dtype=F64).reshape(batch, height, width)  # [B, h, w] weight
    for order in ("released", "aligned"):
        for weight, ws in ((None, None), (w, weights)):
            got = pixel_contrast_loss(f, y[:, 0], weight, pair_order=order).item()  # [B, h, w] labels
            assert got == pytest.approx(reference_loss(feats, labels, ws, order), rel=1e-12)


def test_single_image_orders_agree() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 4, 3, 5, generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (1, 1, 3, 5), generator=gen)
    weight = torch.rand(1, 1, 3, 5, generator=gen, dtype=F64)
    for wt in (None, weight):
        released = pixel_contrast_loss(feats, labels, wt, pair_order="released")
        aligned = pixel_contrast_loss(feats, labels, wt, pair_order="aligned")
        assert released.item() == pytest.approx(aligned.item(), rel=1e-12)


def test_rows_without_positives_contribute_zero() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 3, 1, 2, generator=gen, dtype=F64)
    distinct = torch.tensor([[0, 1], [2, 255]]).reshape(2, 1, 1, 2)
    assert pixel_contrast_loss(feats, distinct).item() == 0.0
    # Only the two rows labelled 5 have a positive; the lone 7 and 9 still count in N = 4.
    labels = torch.tensor([[5, 7], [5, 9]]).reshape(2, 1, 1, 2)
    f = feats.permute(0, 2, 3, 1).reshape(2, 2, 3).tolist()
    for order in ("released", "aligned"):
        got = pixel_contrast_loss(feats, labels, pair_order=order).item()
        ref = reference_loss(f, [[5, 7], [5, 9]], None, order)
        assert got == pytest.approx(ref, rel=1e-12)
    # Aligned: rows 0 and 2 (image 0 px 0, image 1 px 0) are the pair; their only negatives are rows 1 and 3.
    z = torch.nn.functional.normalize(feats, dim=1).permute(0, 2, 3, 1).reshape(4, 3)
    s = z @ z.T
    row0 = s[0, 2] - torch.log(s[0, 2].exp() + s[0, 1].exp() + s[0, 3].exp())
    row2 = s[2, 0] - torch.log(s[2, 0].exp() + s[2, 1].exp() + s[2, 3].exp())
    expected = -(row0 + row2).item() / 4
    assert pixel_contrast_loss(feats, labels, pair_order="aligned").item() == pytest.approx(expected, rel=1e-12)


def test_thing_classes_is_a_no_op_and_gradient_reaches_the_features() -> None:
    feats, labels = to_tensors(TWO_FEATS, TWO_LABELS, 1, 2)
    feats.requires_grad_(True)
    weight = torch.tensor(TWO_WEIGHTS, dtype=torch.float32).reshape(2, 1, 1, 2)
    loss = pixel_contrast_loss(feats, labels, weight)
    same = pixel_contrast_loss(feats, labels, weight, thing_classes=THING_CLASSES)
    assert loss.dtype == F64 and loss.item() == same.item()
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum().item() > 0


def test_float32_features_give_float32() -> None:
    feats, labels = to_tensors(TWO_FEATS, TWO_LABELS, 1, 2)
    loss = pixel_contrast_loss(feats.float(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss(TWO_FEATS, TWO_LABELS, None, "released"), rel=1e-5)


def test_pixel_contrast_loss_rejects_bad_inputs() -> None:
    feats, labels = to_tensors(TWO_FEATS, TWO_LABELS, 1, 2)
    with pytest.raises(ValueError, match="pair_order"):
        pixel_contrast_loss(feats, labels, pair_order="pixel")
    with pytest.raises(ValueError, match="labels"):
        pixel_contrast_loss(feats, labels[:1])
    with pytest.raises(ValueError, match="weight"):
        pixel_contrast_loss(feats, labels, torch.ones(2, 1, 1, 3))
