"""`plca.losses.self_training_loss` (spec self-training.md): CBST/CRST's pseudo-label CE with the released code's
normalisation (crst_seg.py `reg_loss_calc`, `reg_loss_calc_expand`), the MRKLD / MRENT / MRL2 regularisers with
image weights, LRENT's soft targets and TPLD's bootstrapping; each checked against sums written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from plca.losses import cross_entropy, self_training_loss

torch.set_num_threads(1)

F64 = torch.float64
IGN = 255


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _pixel(logits: torch.Tensor, b: int, i: int, j: int) -> list[float]:
    return _softmax(logits[b, :, i, j].tolist())


def _kld(q: list[float]) -> float:
    return -sum(math.log(v) for v in q) / len(q)


def test_without_regulariser_it_is_the_mean_ce_over_labelled_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=gen, dtype=F64)
    labels = torch.randint(0, 5, (2, 4, 6), generator=gen)
    labels[torch.rand(2, 4, 6, generator=gen) < 0.4] = IGN
    want = cross_entropy(logits, labels)
    assert torch.allclose(self_training_loss(logits, labels), want, rtol=1e-14, atol=0)
    # a regulariser at weight 0, or "none" with a weight, adds nothing
    assert torch.allclose(self_training_loss(logits, labels, regularizer="kld"), want, rtol=1e-14, atol=0)
    assert torch.allclose(self_training_loss(logits, labels, weight=3.0), want, rtol=1e-14, atol=0)


def test_mrkld_value_and_gradient_on_a_hand_pixel() -> None:
    # one pixel, C = 3, logits (1, 0, -1), label 0, weight .5:
    # L = -log q0 + .5 * -(1/3) sum_c log q_c;  dL/dz_j = (q_j - [j = 0]) + .5 (q_j - 1/3)
    logits = torch.tensor([1.0, 0.0, -1.0], dtype=F64).reshape(1, 3, 1, 1).requires_grad_()
    labels = torch.tensor([[[0]]])
    loss = self_training_loss(logits, labels, regularizer="kld", weight=0.5)
    q = _softmax([1.0, 0.0, -1.0])
    assert loss.item() == pytest.approx(-math.log(q[0]) + 0.5 * _kld(q), rel=1e-14)
    loss.backward()
    want = [(q[j] - (j == 0)) + 0.5 * (q[j] - 1 / 3) for j in range(3)]
    assert logits.grad.flatten().tolist() == pytest.approx(want, rel=1e-12)
    # the regulariser alone pulls towards uniform: its gradient vanishes there
    flat = torch.zeros(1, 3, 1, 1, dtype=F64, requires_grad=True)
    self_training_loss(flat, torch.tensor([[[IGN]]]), regularizer="kld", weight=1.0,
                       reg_pixels="all").backward()
    assert flat.grad.abs().max().item() < 1e-15


def test_code_normalisation_by_valid_pixels_and_image_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 1, 3, generator=gen, dtype=F64).requires_grad_()
    labels = torch.tensor([[[0, 1, IGN]], [[2, IGN, IGN]]])
    w, iw = 0.5, [0.1, 0.0]
    loss = self_training_loss(logits, labels, regularizer="kld", weight=w, image_weights=iw)
    q = {(b, j): _pixel(logits.detach(), b, 0, j) for b in range(2) for j in range(3)}
    ce = (-math.log(q[0, 0][0]) - math.log(q[0, 1][1]) - math.log(q[1, 0][2])) / 3  # / #valid of the batch
    # the regulariser over the valid pixels of images with iw != 0 (image 0: 2 of them), weighted by iw
    reg = w * (0.1 * (_kld(q[0, 0]) + _kld(q[0, 1]))) / 2
    assert loss.item() == pytest.approx(ce + reg, rel=1e-13)
    loss.backward()
    # image 1 (weight 0) keeps only its CE gradient, (q - onehot) / 3; unlabelled pixels get none
    q10 = q[1, 0]
    assert logits.grad[1, :, 0, 0].tolist() == pytest.approx([q10[0] / 3, q10[1] / 3, (q10[2] - 1) / 3], rel=1e-12)
    assert logits.grad[1, :, 0, 1:].abs().max().item() == 0.0
    assert logits.grad[0, :, 0, 2].abs().max().item() == 0.0


def test_image_weight_zero_removes_an_images_regulariser() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 3, generator=gen, dtype=F64)
    labels = torch.randint(0, 4, (2, 3, 3), generator=gen)
    labels[0, 0] = IGN
    ce = self_training_loss(logits, labels)
    # weights (1, 0) are the same as a batch where image 1's regulariser does not exist
    one = self_training_loss(logits, labels, regularizer="kld", weight=0.3, image_weights=[1.0, 0.0])
    only0 = (self_training_loss(logits[:1], labels[:1], regularizer="kld", weight=0.3)
             - self_training_loss(logits[:1], labels[:1]))
    assert torch.allclose(one - ce, only0, rtol=1e-12, atol=0)
    # all weights 0: the term is dropped (the code's valid_reg_num == 0)
    assert torch.equal(self_training_loss(logits, labels, regularizer="kld", weight=0.3, image_weights=[0.0, 0.0]),
                       ce)
    # None = ones
    ones = self_training_loss(logits, labels, regularizer="kld", weight=0.3, image_weights=torch.ones(2))
    assert torch.equal(self_training_loss(logits, labels, regularizer="kld", weight=0.3), ones)
    # the code's iw = mr_weight_kld on target images: effective weight w^2
    squared = self_training_loss(logits, labels, regularizer="kld", weight=0.1, image_weights=[0.1, 0.0])
    assert torch.allclose(squared, self_training_loss(logits, labels, regularizer="kld", weight=0.01,
                                                      image_weights=[1.0, 0.0]), rtol=1e-14, atol=0)


def test_mrent_mrl2_all_pixels_and_the_kl_constant_by_hand() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]], dtype=F64)  # [1, 2, 1, 2]
    labels = torch.tensor([[[0, IGN]]])
    q0, q1 = _pixel(logits, 0, 0, 0), _pixel(logits, 0, 0, 1)
    ce = -math.log(q0[0])
    ent = self_training_loss(logits, labels, regularizer="ent", weight=2.0)
    assert ent.item() == pytest.approx(ce + 2.0 * sum(v * math.log(v) for v in q0), rel=1e-13)
    l2 = self_training_loss(logits, labels, regularizer="l2", weight=2.0)
    assert l2.item() == pytest.approx(ce + 2.0 * sum(v * v for v in q0), rel=1e-13)
    # the paper's reading: R over every pixel of the weighted images, divided by their count
    every = self_training_loss(logits, labels, regularizer="kld", weight=2.0, reg_pixels="all")
    assert every.item() == pytest.approx(ce + 2.0 * (_kld(q0) + _kld(q1)) / 2, rel=1e-13)
    # kl_constant: the exact KL(u || q) = code's R - log C
    exact = self_training_loss(logits, labels, regularizer="kld", weight=2.0, kl_constant=True)
    assert exact.item() == pytest.approx(ce + 2.0 * (_kld(q0) - math.log(2)), rel=1e-13)


def test_soft_targets_as_the_code_expands_them() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, generator=gen, dtype=F64)
    labels = torch.randint(0, 4, (2, 3, 5), generator=gen)
    labels[1, 1] = IGN
    onehot = torch.nn.functional.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).to(F64)
    onehot = onehot * (labels != IGN)[:, None]
    for kwargs in ({}, {"regularizer": "kld", "weight": 0.1, "image_weights": [0.1, 1.0]}):
        soft_loss = self_training_loss(logits, onehot, **kwargs)
        assert torch.allclose(soft_loss, self_training_loss(logits, labels, **kwargs), rtol=1e-13, atol=0)
    # a soft pixel (.25, .75) and a zero one (ignored, not counted)
    lg = torch.tensor([[[[0.3, -1.0]], [[-0.2, 2.0]]]], dtype=F64)
    soft = torch.tensor([[[[0.25, 0.0]], [[0.75, 0.0]]]], dtype=F64)
    q = _pixel(lg, 0, 0, 0)
    assert self_training_loss(lg, soft).item() == pytest.approx(-(0.25 * math.log(q[0]) + 0.75 * math.log(q[1])),
                                                                rel=1e-13)


def test_tpld_bootstrapping_value_and_stop_gradient() -> None:
    # one pixel, C = 2, label 0, lambda = (.5, .8), beta = .3:
    # L = -sum_c w_c (log q_c - log lambda_c), w = beta t + (1 - beta) sg(q / lambda); dL/dz_j = -(w_j - q_j sum w)
    lam, beta = [0.5, 0.8], 0.3
    logits = torch.tensor([0.5, -0.5], dtype=F64).reshape(1, 2, 1, 1).requires_grad_()
    labels = torch.tensor([[[0]]])
    loss = self_training_loss(logits, labels, bootstrap=beta, thresholds=lam)
    q = _softmax([0.5, -0.5])
    w = [beta * (c == 0) + (1 - beta) * q[c] / lam[c] for c in range(2)]
    assert loss.item() == pytest.approx(-sum(w[c] * (math.log(q[c]) - math.log(lam[c])) for c in range(2)), rel=1e-13)
    loss.backward()
    assert logits.grad.flatten().tolist() == pytest.approx([-(w[j] - q[j] * sum(w)) for j in range(2)], rel=1e-12)
    # beta = 1: the CE plus the constant mean log lambda_y over the labelled pixels
    gen = torch.Generator().manual_seed(4)
    lg = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)
    lab = torch.tensor([[[0, 1], [IGN, 2]], [[2, 2], [IGN, IGN]]])
    thr = torch.tensor([0.9, 0.6, 0.3], dtype=F64)
    boot = self_training_loss(lg, lab, bootstrap=1.0, thresholds=thr)
    want = cross_entropy(lg, lab) + thr.log()[lab[lab != IGN]].mean()
    assert torch.allclose(boot, want, rtol=1e-13, atol=0)
    # with MRKLD on top, the regulariser is added as without bootstrapping
    reg = dict(regularizer="kld", weight=0.1, image_weights=[0.1, 0.0])
    assert torch.allclose(self_training_loss(lg, lab, bootstrap=1.0, thresholds=thr, **reg) - boot,
                          self_training_loss(lg, lab, **reg) - cross_entropy(lg, lab), rtol=1e-12, atol=0)


def test_no_labelled_pixel_gives_a_zero_that_backpropagates_and_dtypes_are_kept() -> None:
    logits = torch.randn(1, 3, 2, 2, dtype=F64, requires_grad=True)
    loss = self_training_loss(logits, torch.full((1, 2, 2), IGN), regularizer="kld", weight=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max().item() == 0.0
    for dtype in (torch.float64, torch.float32):
        lg = torch.randn(2, 3, 2, 2, dtype=dtype)
        lab = torch.randint(0, 3, (2, 2, 2))
        for kwargs in ({}, {"regularizer": "ent", "weight": 0.2}, {"regularizer": "l2", "weight": 0.2},
                       {"regularizer": "kld", "weight": 0.1, "image_weights": [0.1, 0.0],
                        "bootstrap": 0.5, "thresholds": [0.5, 0.6, 0.7]}):
            assert self_training_loss(lg, lab, **kwargs).dtype == dtype
        assert self_training_loss(lg, lg.softmax(1)).dtype == dtype


def test_bad_arguments_are_named() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="regularizer"):
        self_training_loss(logits, labels, regularizer="mrkld")
    with pytest.raises(ValueError, match="thresholds"):
        self_training_loss(logits, labels, bootstrap=0.5)
    with pytest.raises(ValueError, match="bootstrap"):
        self_training_loss(logits, labels, bootstrap=1.5, thresholds=[0.5] * 3)
    with pytest.raises(ValueError, match="image_weights"):
        self_training_loss(logits, labels, regularizer="kld", weight=0.1, image_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="outside"):
        self_training_loss(logits, torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="target"):
        self_training_loss(logits, torch.zeros(1, 2, 2))  # float labels [B, H, W]


def test_one_hot_labels_is_zero_where_unlabelled_in_the_asked_dtype() -> None:
    from plca.losses import one_hot_labels

    labels = torch.tensor([[[2, 255], [0, 1]]])
    got = one_hot_labels(labels, 3, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (1, 3, 2, 2)
    expected = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    expected[0, 2, 0, 0] = expected[0, 0, 1, 0] = expected[0, 1, 1, 1] = 1.0  # pixel (0, 1) unlabelled: all zero
    assert torch.equal(got, expected)
    assert torch.equal(one_hot_labels(torch.tensor([[[7, 0]]]), 3, ignore_index=7)[0, :, 0, 0], torch.zeros(3))
    # as a soft target it gives the int labels' loss exactly
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert float(self_training_loss(logits, got.float())) == float(self_training_loss(logits, labels))
