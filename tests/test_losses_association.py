"""The association loss (spec Eq 1-10): hand-computed cases, the cycle's rules, agreement with the dense
reference, and the properties a wrong reading of the spec would break."""

from __future__ import annotations

import math

import pytest
import torch

import plca.losses.association as association_module
from plca.losses import AssociationConfig, associate, association_loss, spatial_aggregate
from plca.losses.dense import dense_association_loss, dense_spatial_aggregate

F64 = torch.float64


def image(*pixels: tuple[float, ...]) -> torch.Tensor:
    """Pixels given as feature vectors -> one image [1, C, 1, P] (a single row of pixels)."""
    return torch.tensor(pixels, dtype=F64).T.reshape(1, len(pixels[0]), 1, len(pixels))


def labels(*values: int) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, len(values))


def cn_softmax(row: list[float]) -> list[float]:
    """softmax(CN(row)) written out: mean, unbiased std, (d - mean) / (std + 1e-10), softmax."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((d - mean) ** 2 for d in row) / (len(row) - 1))
    scores = [math.exp((d - mean) / (std + 1e-10)) for d in row]
    return [s / sum(scores) for s in scores]


# ---- hand-computed cases -------------------------------------------------------------------------------------


def test_two_by_two_rows_have_the_closed_form_probability() -> None:
    # Any row of 2 distinct values has CN scores +-1/sqrt(2), so its maximum softmax is sigmoid(sqrt(2)).
    src = image((1.0, 0.0), (0.0, 1.0))
    tgt = image((1.0, 0.2), (0.3, 1.0))
    loss = association_loss(src, tgt, labels(4, 7), aggregate_target=False)
    p = 1.0 / (1.0 + math.exp(-math.sqrt(2.0)))
    assert loss.item() == pytest.approx(-2.0 * math.log(p), rel=1e-9)


def test_three_target_pixels_by_hand() -> None:
    r = 1.0 / math.sqrt(2.0)
    src = image((1.0, 0.0), (0.0, 1.0))
    tgt = image((1.0, 0.0), (0.0, 1.0), (r, r))
    # D_st rows: (1, 0, r) and (0, 1, r): j* = 0 and 1; D_ts rows 0 and 1: (1, 0), (0, 1): back to i = 0, 1.
    res = associate(src, tgt, labels(0, 1), aggregate_target=False)
    assert res.target_index.flatten().tolist() == [0, 1]
    assert res.return_index.flatten().tolist() == [0, 1]
    p_st = cn_softmax([1.0, 0.0, r])[0]
    p_ts = 1.0 / (1.0 + math.exp(-math.sqrt(2.0)))
    assert res.loss.item() == pytest.approx(-math.log(p_st) - math.log(p_ts), rel=1e-9)
    assert res.num_positive == 2 and res.num_valid_source == 2


def test_cycle_returning_elsewhere_is_positive_only_with_the_same_label() -> None:
    src = image((1.0, 0.0), (0.8, 0.6))
    tgt = image((1.0, 0.0), (0.0, 1.0))
    # Both source pixels pick target 0, whose best source pixel is 0: pixel 1's cycle returns to pixel 0.
    same = associate(src, tgt, labels(3, 3), aggregate_target=False)
    assert same.return_index.flatten().tolist() == [0, 0]
    assert same.positive.flatten().tolist() == [True, True]
    different = associate(src, tgt, labels(3, 4), aggregate_target=False)
    assert different.positive.flatten().tolist() == [True, False]
    # the loss averages pixel 0's term only: -log P_st[0, 0] - log P_ts[0, 0]
    p_st = 1.0 / (1.0 + math.exp(-math.sqrt(2.0)))
    p_ts = cn_softmax([1.0, 0.8])[0]
    assert different.loss.item() == pytest.approx(-math.log(p_st) - math.log(p_ts), rel=1e-9)


def test_ignored_pixel_starts_no_cycle_but_can_be_returned_to() -> None:
    src = image((1.0, 0.0), (0.8, 0.6))
    tgt = image((1.0, 0.0), (0.0, 1.0))
    res = associate(src, tgt, labels(255, 3), aggregate_target=False)
    assert res.target_index.flatten().tolist() == [-1, 0]  # pixel 0 (ignored) starts nothing
    assert res.return_index.flatten().tolist() == [-1, 0]  # pixel 1 returns to the ignored pixel 0 ...
    assert res.num_positive == 0 and res.num_valid_source == 1  # ... which is not a positive
    src_leaf, tgt_leaf = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    loss = association_loss(src_leaf, tgt_leaf, labels(255, 3), aggregate_target=False)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(src_leaf.grad, torch.zeros_like(src)) and torch.equal(tgt_leaf.grad, torch.zeros_like(tgt))


def test_kl_directions_by_hand() -> None:
    # Sim-PLCA on probabilities, written out: D_st[i, j] = -KL(p_i || q_j), D_ts[j, i] = -KL(q_j || p_i).
    p = [(0.7, 0.2, 0.1), (0.1, 0.3, 0.6)]
    q = [(0.6, 0.3, 0.1), (0.2, 0.2, 0.6)]

    def kl(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        return sum(x * (math.log(x + 1e-10) - math.log(y + 1e-10)) for x, y in zip(a, b, strict=True))

    res = associate(image(*p), image(*q), labels(1, 2), similarity="kl", aggregate_target=False, contrastive=False)
    assert res.target_index.flatten().tolist() == [0, 1] and res.num_positive == 2
    expected = sum(kl(p[i], q[i]) + kl(q[i], p[i]) for i in range(2)) / 2
    assert res.loss.item() == pytest.approx(expected, rel=1e-9)
    # KL is asymmetric here, so reading both directions the same way would give another value
    assert abs(expected - sum(2 * kl(p[i], q[i]) for i in range(2)) / 2) > 1e-3
    contrastive = associate(image(*p), image(*q), labels(1, 2), similarity="kl", aggregate_target=False)
    d_st0 = [-kl(p[0], q[0]), -kl(p[0], q[1])]
    d_ts0 = [-kl(q[0], p[0]), -kl(q[0], p[1])]
    d_st1 = [-kl(p[1], q[0]), -kl(p[1], q[1])]
    d_ts1 = [-kl(q[1], p[0]), -kl(q[1], p[1])]
    by_hand = -(math.log(cn_softmax(d_st0)[0]) + math.log(cn_softmax(d_ts0)[0])
                + math.log(cn_softmax(d_st1)[1]) + math.log(cn_softmax(d_ts1)[1])) / 2
    assert contrastive.loss.item() == pytest.approx(by_hand, rel=1e-9)


def test_log_clamp_of_the_released_bce(monkeypatch: pytest.MonkeyPatch) -> None:
    # The product P_st * P_ts >= 1 / L^2 never reaches exp(-100) at real sizes: force tiny log-probabilities.
    def tiny(*args, **kwargs):
        return (torch.full((2,), -80.0, dtype=F64, requires_grad=True),) * 2

    monkeypatch.setattr(association_module, "picked_log_softmax", tiny)
    monkeypatch.setattr(association_module, "transposed_picks", tiny)
    for similarity, src, tgt in (("cosine", image((1.0, 0.0), (0.0, 1.0)), image((1.0, 0.2), (0.3, 1.0))),
                                 ("kl", image((0.8, 0.2), (0.3, 0.7)), image((0.7, 0.3), (0.1, 0.9)))):
        loss = association_loss(src, tgt, labels(0, 1), similarity=similarity, aggregate_target=False)
        assert loss.item() == pytest.approx(100.0)


# ---- agreement with the dense reference ----------------------------------------------------------------------


def random_batch(similarity: str, n: int = 3, c: int = 5, h: int = 4, w: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, c, h, w, generator=g, dtype=F64)
    tgt = torch.randn(n, c, h, w, generator=g, dtype=F64)
    if similarity == "kl":
        src, tgt = (2 * src).softmax(1), (2 * tgt).softmax(1)
    lab = torch.randint(0, 3, (n, h, w), generator=g)
    lab[torch.rand(n, h, w, generator=g) < 0.25] = 255
    return src, tgt, lab


def loss_and_grads(fn, src, tgt, lab, **kwargs):
    s, t = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    loss = fn(s, t, lab, **kwargs)
    loss.backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize(("similarity", "cache"), [("cosine", False), ("cosine", True), ("kl", False)])
@pytest.mark.parametrize("contrastive", [True, False])
@pytest.mark.parametrize("aggregate_target", [True, False])
@pytest.mark.parametrize("block_rows", [None, 3])
def test_matches_dense_reference(similarity: str, cache: bool, contrastive: bool, aggregate_target: bool,
                                 block_rows: int | None) -> None:
    src, tgt, lab = random_batch(similarity, seed=7)
    common = dict(similarity=similarity, contrastive=contrastive, aggregate_target=aggregate_target)
    ours = loss_and_grads(association_loss, src, tgt, lab, block_rows=block_rows, cache_similarities=cache,
                          **common)
    dense = loss_and_grads(dense_association_loss, src, tgt, lab, **common)
    assert associate(src, tgt, lab, **common).num_positive > 0
    for a, b in zip(ours, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_source_and_target_of_different_sizes() -> None:
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(2, 4, 3, 5, generator=g, dtype=F64), torch.randn(2, 4, 4, 2, generator=g, dtype=F64)
    lab = torch.randint(0, 2, (2, 3, 5), generator=g)
    ours = loss_and_grads(association_loss, src, tgt, lab, block_rows=2)
    dense = loss_and_grads(dense_association_loss, src, tgt, lab)
    for a, b in zip(ours, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_matches_dense() -> None:
    g = torch.Generator().manual_seed(5)
    src, tgt = torch.randn(2, 16, 5, 5, generator=g).relu(), torch.randn(2, 16, 5, 5, generator=g).relu()
    lab = torch.randint(0, 2, (2, 5, 5), generator=g)
    ours = loss_and_grads(association_loss, src, tgt, lab)
    dense = loss_and_grads(dense_association_loss, src, tgt, lab)
    torch.testing.assert_close(ours[0], dense[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1:], dense[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


# ---- properties ----------------------------------------------------------------------------------------------


def test_cn_statistics_carry_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    import plca.losses.dense as dense

    src, tgt, lab = random_batch("cosine", n=1, seed=11)
    ours = loss_and_grads(association_loss, src, tgt, lab, aggregate_target=False)
    detached = loss_and_grads(dense_association_loss, src, tgt, lab, aggregate_target=False)

    def attached_cn(d: torch.Tensor) -> torch.Tensor:  # the reading the spec rules out
        return (d - d.mean(-1, keepdim=True)) / (d.std(-1, keepdim=True) + 1e-10)

    monkeypatch.setattr(dense, "dense_contrast_normalise", attached_cn)
    attached = loss_and_grads(dense_association_loss, src, tgt, lab, aggregate_target=False)
    torch.testing.assert_close(ours[0], attached[0])  # same value ...
    torch.testing.assert_close(ours[1], detached[1])
    assert (ours[1] - attached[1]).abs().max() > 1e-3  # ... but only the detached reading's gradient


def test_no_positive_gives_zero_loss_and_zero_gradients() -> None:
    src, tgt, lab = random_batch("cosine", seed=2)
    for lab_case in (torch.full_like(lab, 255), None):
        if lab_case is None:  # every cycle ends on a pixel of another label: labels all distinct
            lab_case = torch.arange(lab.numel()).reshape(lab.shape)
            res = associate(src, tgt, lab_case)
            lab_case = torch.where(res.return_index == torch.arange(20).reshape(1, 4, 5), 255, lab_case)
        loss, gs, gt = loss_and_grads(association_loss, src, tgt, lab_case)
        assert loss.item() == 0.0
        assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


def test_invariant_to_permuting_target_pixels() -> None:
    for similarity in ("cosine", "kl"):
        src, tgt, lab = random_batch(similarity, n=2, seed=4)
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
        tgt_perm = tgt.flatten(2)[:, :, perm].reshape(tgt.shape)
        loss, gs, gt = loss_and_grads(association_loss, src, tgt, lab, similarity=similarity)
        loss_p, gs_p, gt_p = loss_and_grads(association_loss, src, tgt_perm, lab, similarity=similarity)
        torch.testing.assert_close(loss, loss_p)
        torch.testing.assert_close(gs, gs_p)
        torch.testing.assert_close(gt.flatten(2)[:, :, perm], gt_p.flatten(2))


def test_batch_mean_is_over_all_positives() -> None:
    src, tgt, lab = random_batch("cosine", n=2, seed=8)
    lab[1, :3] = 255  # fewer labelled pixels in pair 1
    per_pair = [associate(src[n : n + 1], tgt[n : n + 1], lab[n : n + 1]) for n in range(2)]
    counts = [r.num_positive for r in per_pair]
    assert counts[0] != counts[1] and min(counts) > 0
    batch = associate(src, tgt, lab)
    assert batch.num_positive == sum(counts)
    pooled = sum(r.loss.item() * r.num_positive for r in per_pair) / sum(counts)
    assert batch.loss.item() == pytest.approx(pooled, rel=1e-12)
    assert batch.loss.item() != pytest.approx(sum(r.loss.item() for r in per_pair) / 2, rel=1e-6)


def test_pairs_are_matched_by_index() -> None:
    src, tgt, lab = random_batch("cosine", n=2, seed=9)
    swapped = associate(src, tgt.flip(0), lab)
    alone = associate(src[:1], tgt[1:], lab[:1])
    assert torch.equal(swapped.target_index[:1], alone.target_index)


def test_result_diagnostics() -> None:
    src, tgt, lab = random_batch("kl", seed=12)
    res = associate(src, tgt, lab, similarity="kl")
    valid = lab != 255
    assert res.num_valid_source == int(valid.sum())
    assert res.positive.shape == lab.shape and not res.positive[~valid].any()
    assert res.num_positive == int(res.positive.sum())
    assert ((res.target_index >= 0) == valid).all() and ((res.return_index >= 0) == valid).all()
    # positives are exactly the labelled pixels whose return pixel has their label
    back_labels = torch.gather(lab.flatten(1), 1, res.return_index.flatten(1).clamp(min=0)).reshape(lab.shape)
    assert torch.equal(res.positive, valid & (back_labels == lab))
    assert res.positive_rate == pytest.approx(res.num_positive / res.num_valid_source)


def test_block_size_does_not_change_the_result() -> None:
    src, tgt, lab = random_batch("cosine", n=1, h=5, w=7, seed=13)
    reference = loss_and_grads(association_loss, src, tgt, lab)
    for block_rows in (1, 2, 5, 64):
        for a, b in zip(loss_and_grads(association_loss, src, tgt, lab, block_rows=block_rows), reference,
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_config_fields_are_the_keyword_arguments() -> None:
    import dataclasses

    src, tgt, lab = random_batch("kl", n=1, seed=14)
    cfg = AssociationConfig(similarity="kl", alpha=0.3, block_rows=4)
    assert association_loss(src, tgt, lab, **dataclasses.asdict(cfg)).item() == pytest.approx(
        dense_association_loss(src, tgt, lab, similarity="kl", alpha=0.3).item(), rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(similarity="dot"), "similarity must be one of"),
        (dict(alpha=1.5), "alpha must lie in"),
        (dict(block_rows=0), "block_rows must be >= 1"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    src, tgt, lab = random_batch("cosine", n=1)
    with pytest.raises(ValueError, match=message):
        association_loss(src, tgt, lab, **kwargs)


def test_bad_shapes_are_refused() -> None:
    src, tgt, lab = random_batch("cosine", n=2)
    with pytest.raises(ValueError, match="share N and C"):
        association_loss(src, tgt[:1], lab)
    with pytest.raises(ValueError, match=r"source_labels must be \[N, h, w\]"):
        association_loss(src, tgt, lab[:, :2])
    with pytest.raises(ValueError, match="integer tensor"):
        association_loss(src, tgt, lab.double())
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        association_loss(src[0], tgt, lab)


# ---- spatial aggregation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("similarity", "cache"), [("cosine", False), ("cosine", True), ("kl", False)])
def test_spatial_aggregate_matches_dense(similarity: str, cache: bool) -> None:
    src, _, _ = random_batch(similarity, n=2, seed=21)
    grad_out = torch.randn_like(src)
    results = []
    ours = dict(block_rows=3, cache_similarities=cache)
    for fn, kwargs in ((spatial_aggregate, ours), (dense_spatial_aggregate, {})):
        x = src.clone().requires_grad_()
        y = fn(x, similarity, 0.3, **kwargs)
        (y * grad_out).sum().backward()
        results.append((y.detach(), x.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_spatial_aggregate_weights_by_hand() -> None:
    # weights = aggregate of one-hot pixel indicators: rows sum to 1, the diagonal is kept, CN-softmax of cos
    r = 1.0 / math.sqrt(2.0)
    feats = image((1.0, 0.0), (r, r), (0.0, 1.0))
    # append 3 indicator channels scaled to a negligible size so they do not change the cosines
    eye = 1e-9 * torch.eye(3, dtype=F64).reshape(3, 1, 3)
    x = torch.cat([feats, eye.unsqueeze(0)], dim=1)
    out = spatial_aggregate(x, "cosine", alpha=1.0)
    weights = (out[0, 2:, 0, :] / 1e-9).T  # row j: weights of pixel j over k
    cos = [[1.0, r, 0.0], [r, 1.0, r], [0.0, r, 1.0]]
    for j in range(3):
        assert weights[j].tolist() == pytest.approx(cn_softmax(cos[j]), rel=1e-6)
        assert weights[j].sum().item() == pytest.approx(1.0, rel=1e-9)
        assert weights[j, j] == weights[j].max() > 0


def test_spatial_aggregate_alpha_zero_is_identity_and_constant_images_are_fixed() -> None:
    src, _, _ = random_batch("kl", n=2, seed=22)
    assert torch.equal(spatial_aggregate(src, "kl", alpha=0.0), src)
    constant = torch.ones(1, 4, 3, 3, dtype=F64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64).reshape(1, 4, 1, 1)
    torch.testing.assert_close(spatial_aggregate(constant, "cosine", alpha=0.7), constant)
    probs = constant / constant.sum(1, keepdim=True)
    torch.testing.assert_close(spatial_aggregate(probs, "kl", alpha=0.7), probs)


def test_half_precision_inputs_and_autocast_compute_in_float32() -> None:
    src, tgt, lab = random_batch("cosine", n=2, seed=23)
    src_bf, tgt_bf = src.bfloat16(), tgt.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = association_loss(src_bf, tgt_bf, lab)
        agg = spatial_aggregate(tgt_bf)
    assert loss.dtype == torch.float32 and agg.dtype == torch.bfloat16
    reference = association_loss(src_bf.float(), tgt_bf.float(), lab)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_auto_takes_the_dense_kernels_up_to_the_paper_grids_on_a_gpu_only() -> None:
    """The paper's training batch (4 pairs of 92x92 grids) is dense on CUDA (twice as fast on an H200) and
    block-wise on the CPU (faster there); full-resolution inference (one 128x256 grid) is block-wise on both."""
    choose, cpu, cuda = association_module._dense, torch.device("cpu"), torch.device("cuda")
    paper, full_res, toy = 4 * (92 * 92) ** 2, (128 * 256) ** 2, 4 * (8 * 16) ** 2
    assert choose("auto", paper, cuda) and not choose("auto", paper, cpu)
    assert not choose("auto", full_res, cuda) and not choose("auto", full_res, cpu)
    assert choose("auto", toy, cpu) and choose("auto", toy, cuda)
    assert choose("dense", full_res, cpu) and not choose("blocked", toy, cuda)
    with pytest.raises(ValueError, match="impl must be 'auto', 'blocked' or 'dense', got 'fast'"):
        choose("fast", toy, cpu)
