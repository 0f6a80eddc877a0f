"""Lovasz-softmax, the adaptive label smoothing regulariser (Eq 13) and the masked cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plca.losses import adaptive_lsr, cross_entropy, lovasz_softmax
from plca.losses.lovasz import lovasz_gradient, sort_descending

F64 = torch.float64


def test_lovasz_equals_one_minus_iou_on_hard_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    labels[0, 0] = 255
    pred = torch.randint(0, 5, (2, 5, 6), generator=g)
    probs = F.one_hot(pred, 5).permute(0, 3, 1, 2).to(F64)
    keep = labels != 255
    jaccard = []
    for c in torch.unique(labels[keep]).tolist():  # classes present in the labels, the batch as one set
        truth, guess = (labels == c) & keep, (pred == c) & keep
        jaccard.append(1.0 - (truth & guess).sum().item() / (truth | guess).sum().item())
    assert lovasz_softmax(probs, labels).item() == pytest.approx(sum(jaccard) / len(jaccard), rel=1e-12)


def test_lovasz_treats_the_batch_as_one_set() -> None:
    # image 0: labels (0, 0), predicted (0, 0); image 1: labels (0, 1), predicted (1, 1)
    labels = torch.tensor([[[0, 0]], [[0, 1]]])
    pred = torch.tensor([[[0, 0]], [[1, 1]]])
    probs = F.one_hot(pred, 2).permute(0, 3, 1, 2).to(F64)
    # one set: class 0 truth {0, 1, 2}, predicted {0, 1}: IoU 2/3; class 1 truth {3}, predicted {2, 3}: IoU 1/2.
    # Per image it would be mean(0, mean(1, 1/2)) = 0.375 instead.
    expected = ((1 - 2 / 3) + (1 - 1 / 2)) / 2
    assert lovasz_softmax(probs, labels).item() == pytest.approx(expected, rel=1e-12)


def test_lovasz_gradcheck_and_ignore() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 3, 2, 3, generator=g, dtype=F64).softmax(1).requires_grad_()
    labels = torch.tensor([[[0, 2, 255], [1, 1, 0]]])
    assert torch.autograd.gradcheck(lambda p: lovasz_softmax(p, labels), (probs,), fast_mode=True)
    # an ignored pixel's prediction does not matter
    changed = probs.detach().clone()
    changed[0, :, 0, 2] = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    assert lovasz_softmax(changed, labels).item() == pytest.approx(lovasz_softmax(probs, labels).item())


def _lovasz_one_class_at_a_time(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Berman et al.'s formulation written plainly: one sort per present class."""
    flat = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    lab = labels.reshape(-1)
    flat, lab = flat[lab != 255], lab[lab != 255]
    losses = []
    for c in torch.unique(lab).tolist():
        truth = (lab == c).to(flat.dtype)
        errors, order = torch.sort((truth - flat[:, c]).abs(), descending=True, stable=True)  # ties: index order
        t = truth[order]
        jaccard = 1 - (t.sum() - t.cumsum(0)) / (t.sum() + (1 - t).cumsum(0))
        losses.append(errors @ torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]]))
    return torch.stack(losses).mean()


def test_lovasz_batched_classes_equal_one_sort_per_class() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 7, 9, generator=g, dtype=F64)
    logits[:, :, :2] = logits[:, :, 2:4]  # repeated rows: tied errors
    labels = torch.randint(0, 5, (3, 7, 9), generator=g)  # class 5 absent
    labels[1, 3:] = 255
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    batched, plain = lovasz_softmax(a.softmax(1), labels), _lovasz_one_class_at_a_time(b.softmax(1), labels)
    batched.backward()
    plain.backward()
    assert batched.item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("overwrite", [False, True])
def test_lovasz_gradient_by_hand(overwrite: bool) -> None:
    """Truth (1, 0, 1, 1, 0): J(k) = 1 - |truth \\ first k| / |truth | first k| = 1/3, 1/2, 3/4, 1, 1, so the
    gradient is (1/3, 1/6, 1/4, 1/4, 0); the input kept unless `overwrite`."""
    truth = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]], dtype=F64)
    given = truth.clone()
    got = lovasz_gradient(given, overwrite=overwrite)
    want = torch.tensor([[1 / 3, 1 / 6, 1 / 4, 1 / 4, 0.0], [1 / 2, 1 / 2, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert torch.equal(given, truth) != overwrite


def _lovasz_through_autograd(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batched formula (class-major rows, one stable sort) through autograd's own ops."""
    lab = labels.reshape(-1)
    keep = (lab != 255).nonzero().squeeze(1)
    lab = lab[keep]
    classes = torch.unique(lab)
    rows = probs.transpose(0, 1).reshape(probs.shape[1], -1).index_select(0, classes).index_select(1, keep)
    truth = (classes[:, None] == lab[None]).to(rows.dtype)
    errors = (truth - rows).abs()
    order = torch.sort(errors.detach(), dim=1, descending=True, stable=True).indices
    t = torch.gather(truth, 1, order)
    total, hits = t.sum(1, keepdim=True), t.cumsum(1)
    jaccard = 1.0 - (total - hits) / (total + (torch.arange(1, t.shape[1] + 1, dtype=t.dtype) - hits))
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    return (errors.gather(1, order) * grad).sum(1).mean()


@pytest.mark.parametrize("case", range(6))
def test_lovasz_backward_is_autograds_bit_for_bit(case: int) -> None:
    """lovasz_softmax's own backward gives autograd's floats exactly, so trainings are unchanged by it (float32,
    as trained; ties, ignored pixels, an absent class, probabilities of exactly 0 and 1)."""
    g = torch.Generator().manual_seed(case)
    logits = torch.randn(3, 7, 9, 11, generator=g) * (1.0 if case % 2 else 25.0)  # x25: saturated softmax
    labels = torch.randint(0, 6, (3, 9, 11), generator=g)  # class 6 absent
    labels[torch.rand(3, 9, 11, generator=g) < 0.2] = 255
    if case >= 4:  # the probabilities themselves, exact zeros and ones among them: abs' sign is 0 there
        logits = logits.softmax(1).round()
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    pa, pb = (a, b) if case >= 4 else (a.softmax(1), b.softmax(1))
    got, want = lovasz_softmax(pa, labels), _lovasz_through_autograd(pb, labels)
    got.backward()
    want.backward()
    assert torch.equal(got, want) and torch.equal(a.grad, b.grad)
    assert a.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [5, 1000, 40000])
def test_sort_descending_is_torchs_stable_sort(p: int) -> None:
    """The CPU's packed-key sort puts ties in index order, as a stable sort: many ties (values on a 1/8 grid,
    zeros, ones) and a float64 input, which takes torch's own sort."""
    g = torch.Generator().manual_seed(p)
    errors = (torch.randint(0, 9, (4, p), generator=g) / 8.0).float()
    errors[0, : p // 2] = 0.0
    for e in (errors, errors.double(), torch.rand(3, p, generator=g)):
        want = torch.sort(e, dim=1, descending=True, stable=True).indices
        got = sort_descending(e)
        assert got.dtype == torch.int64 and torch.equal(got, want)


def test_lovasz_without_labels_is_a_differentiable_zero() -> None:
    probs = torch.rand(1, 3, 2, 2, dtype=F64).softmax(1).requires_grad_()
    loss = lovasz_softmax(probs, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(probs.grad, torch.zeros_like(probs))


def test_lovasz_refuses_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 3\)"):
        lovasz_softmax(torch.rand(1, 3, 2, 2).softmax(1), torch.full((1, 2, 2), 7))


def test_lsr_value_by_hand() -> None:
    logits = torch.tensor([2.0, 0.0, -1.0], dtype=F64).reshape(1, 3, 1, 1)
    lse = math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    u = -((2.0 - lse) + (0.0 - lse) + (-1.0 - lse)) / 3
    assert adaptive_lsr(logits, tau=10.0).item() == pytest.approx((u / 10.0 - 1.0) * u, rel=1e-12)


@pytest.mark.parametrize("tau", [10.0, 5.0])
def test_lsr_gradient_is_that_of_the_squared_distance_to_tau(tau: float) -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 5, 3, 4, generator=g, dtype=F64) * 4).requires_grad_()
    adaptive_lsr(logits, tau=tau).backward()
    ours = logits.grad.clone()
    logits.grad = None
    u = -torch.log_softmax(logits, dim=1).mean(dim=1)
    ((u - tau) ** 2 / (2 * tau)).mean().backward()
    torch.testing.assert_close(ours, logits.grad)
    # below tau it sharpens (u falls), above it smooths: both sides occur with these logits at tau = 5
    if tau == 5.0:
        assert (u < tau).any() and (u > tau).any()


def test_lsr_refuses_bad_tau() -> None:
    with pytest.raises(ValueError, match="tau must be positive"):
        adaptive_lsr(torch.zeros(1, 2, 1, 1), tau=0.0)


def test_cross_entropy_is_the_mean_over_labelled_pixels() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (2, 3, 3), generator=g)
    labels[0, 0] = 255
    keep = labels != 255
    per_pixel = -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=3).unsqueeze(1)).squeeze(1)
    assert cross_entropy(logits, labels).item() == pytest.approx(per_pixel[keep].mean().item(), rel=1e-12)
    leaf = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, labels), (leaf,), fast_mode=True)


def test_cross_entropy_without_labels_is_a_differentiable_zero() -> None:
    logits = torch.randn(1, 3, 2, 2, dtype=F64, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_refuses_bad_labels_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"labels \[5\] outside \[0, 3\)"):
        cross_entropy(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 5], [1, 255]]]))
    with pytest.raises(ValueError, match=r"logits \[N, C, H, W\] and labels \[N, H, W\]"):
        cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long))
