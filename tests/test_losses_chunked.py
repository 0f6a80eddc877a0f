"""The block-wise autograd kernels behind the association loss: gradcheck and agreement with explicit matrices."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.autograd import gradcheck

from plca.losses.chunked import (
    Pick,
    aggregate,
    column_statistics,
    cosine_aggregate,
    picked_log_softmax,
    row_statistics,
    transposed_picks,
    unit_rows,
)

F64 = torch.float64


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def cn_inverse(d: torch.Tensor) -> torch.Tensor:
    return 1.0 / (d.std(dim=-1) + 1e-10)


@pytest.mark.parametrize("block_rows", [1, 2, None])
def test_aggregate_gradcheck(block_rows: int | None) -> None:
    q, k, v = rand(2, 5, 3, seed=0), rand(2, 5, 3, seed=1), rand(2, 5, 4, seed=2)
    inv = rand(2, 5, seed=3).abs() + 0.5  # the scale is a constant input: gradcheck then sees the same function
    fn = lambda q, k, v: aggregate(q, k, v, inv, alpha=0.6, block_rows=block_rows)  # noqa: E731
    assert gradcheck(fn, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("block_rows", [1, 3, None])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("alpha", [0.4, 1.0])  # backward reads agg back from y, or y is agg
def test_cosine_aggregate_gradcheck(block_rows: int | None, cache: bool, alpha: float) -> None:
    v = rand(2, 7, 3, seed=4)
    inv = rand(2, 7, seed=6).abs() + 0.5
    fn = lambda v: cosine_aggregate(v, inv, alpha=alpha, block_rows=block_rows, cache=cache)  # noqa: E731
    assert gradcheck(fn, (v.requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("cache", [False, True])
def test_aggregate_with_cn_equals_the_explicit_formula(cache: bool) -> None:
    v = rand(1, 9, 3, seed=7)
    x = torch.nn.functional.normalize(v, dim=-1)
    d = x[0] @ x[0].T
    cn = (d - d.mean(1, keepdim=True)) / (d.std(1, keepdim=True) + 1e-10)  # with the cache: moments merged by block
    expected = 0.3 * v[0] + 0.7 * torch.softmax(cn, 1) @ v[0]
    torch.testing.assert_close(cosine_aggregate(v, None, alpha=0.7, block_rows=2, cache=cache)[0], expected)
    torch.testing.assert_close(aggregate(x, x, v, None, alpha=0.7, block_rows=2)[0], expected)


def test_cosine_aggregate_cache_survives_a_second_backward() -> None:
    leaf = rand(1, 9, 3, seed=21).requires_grad_()
    y = cosine_aggregate(leaf, None, alpha=0.7, block_rows=2, cache=True)
    first = torch.autograd.grad(y.sum(), leaf, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(y.sum(), leaf)[0], first)


def test_picked_log_softmax_gradcheck_and_value() -> None:
    a, b, c = rand(6, 3, seed=9), rand(5, 3, seed=10), rand(4, 3, seed=11)
    rows_ab, cols_ab = torch.tensor([4, 0, 2]), torch.tensor([1, 1, 3])
    rows_ba, cols_ba = torch.tensor([3, 1]), torch.tensor([5, 0])
    inv_ab, inv_ba = torch.tensor([0.5, 2.0, 1.0], dtype=F64), torch.tensor([1.5, 0.7], dtype=F64)
    picks = [Pick(0, 1, rows_ab, cols_ab, inv_ab), Pick(1, 0, rows_ba, cols_ba, inv_ba), Pick(2, 1, rows_ba,
                                                                                             cols_ab[:2], inv_ba)]

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return picked_log_softmax([a, b, c], picks, block_rows=2)

    assert gradcheck(fn, (a.requires_grad_(), b.requires_grad_(), c.requires_grad_()), fast_mode=True)
    values = fn(a, b, c)
    expected = torch.log_softmax(inv_ab[:, None] * (a[rows_ab] @ b.T), 1)[torch.arange(3), cols_ab]
    torch.testing.assert_close(values[0], expected)
    # with the statistics of a no-grad pass: same values and gradients
    stats = row_statistics(a.detach(), b.detach(), normalise=False, rows=rows_ab, inv_scale=inv_ab)
    known = Pick(0, 1, rows_ab, cols_ab, inv_ab, stats.row_max, stats.log_sum)
    with_stats = picked_log_softmax([a, b], [known])[0]
    torch.testing.assert_close(with_stats, expected)
    grads = torch.autograd.grad(with_stats.sum(), (a, b))
    torch.testing.assert_close(grads, torch.autograd.grad(expected.sum(), (a, b)))


def test_column_statistics_are_those_of_the_transpose() -> None:
    a, b = rand(7, 4, seed=23), rand(9, 4, seed=24)
    d = a @ b.T
    cols = torch.tensor([8, 1, 4])
    from_columns = column_statistics(d, cols, normalise=True, block_rows=2)
    from_rows = row_statistics(b, a, normalise=True, rows=cols)
    for x, y in zip(vars(from_columns).values(), vars(from_rows).values(), strict=True):
        torch.testing.assert_close(x, y)
    kept = torch.empty(7, 9, dtype=F64)
    row_statistics(a, b, normalise=True, keep=kept, block_rows=3)
    torch.testing.assert_close(kept, d)


def test_row_statistics_equal_torch_on_the_explicit_matrix() -> None:
    a, b = rand(7, 4, seed=12), rand(9, 4, seed=13)
    rows = torch.tensor([6, 2, 3])
    d = a[rows] @ b.T
    stats = row_statistics(a, b, normalise=True, rows=rows, block_rows=2)
    inv = cn_inverse(d)
    torch.testing.assert_close(stats.inv_scale, inv)
    assert torch.equal(stats.argmax, d.argmax(1))
    torch.testing.assert_close(stats.row_max, d.max(1).values)
    lse = torch.logsumexp(inv[:, None] * d, 1)
    torch.testing.assert_close(stats.row_max * inv + stats.log_sum, lse)
    plain = row_statistics(a, b, normalise=False)
    torch.testing.assert_close(plain.row_max + plain.log_sum, torch.logsumexp(a @ b.T, 1))


@pytest.mark.parametrize("keep_input", [False, True])
def test_unit_rows_matches_normalize_and_gradcheck(keep_input: bool) -> None:
    x = rand(2, 5, 3, seed=14)
    x[0, 1] = 0.0  # a zero row: the norm floor takes over, as in F.normalize
    torch.testing.assert_close(unit_rows(x, keep_input=keep_input), torch.nn.functional.normalize(x, dim=-1))
    # gradcheck away from the floor (finite differences jump across it)
    assert gradcheck(lambda t: unit_rows(t, keep_input=keep_input), (x[1:].clone().requires_grad_(),), fast_mode=True)
    y = x.clone().requires_grad_()
    g = rand(2, 5, 3, seed=15)
    ours = torch.autograd.grad((unit_rows(y, keep_input=keep_input) * g).sum(), y)[0]
    ref = torch.autograd.grad((torch.nn.functional.normalize(y, dim=-1) * g).sum(), y)[0]
    torch.testing.assert_close(ours, ref)


def test_picks_need_both_statistics() -> None:
    a = rand(3, 2, seed=16)
    pick = Pick(0, 0, torch.tensor([0]), torch.tensor([1]), torch.ones(1, dtype=F64), row_max=torch.zeros(1))
    with pytest.raises(ValueError, match="give both row_max and log_sum"):
        picked_log_softmax([a], [pick])


@pytest.mark.parametrize("block_rows", [1, 2, None])
def test_transposed_picks_equal_separate_picks_and_gradcheck(block_rows: int | None) -> None:
    a, b = rand(6, 3, seed=17), rand(5, 3, seed=18)
    pick_ab = Pick(0, 1, torch.tensor([4, 0, 2]), torch.tensor([1, 1, 3]), torch.tensor([0.5, 2.0, 1.0], dtype=F64))
    pick_ba = Pick(1, 0, torch.tensor([1, 3]), torch.tensor([5, 0]), torch.tensor([1.5, 0.7], dtype=F64))

    def joint(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return transposed_picks(a, b, [pick_ab], [pick_ba], block_rows=block_rows)

    assert gradcheck(joint, (a.requires_grad_(), b.requires_grad_()), fast_mode=True)
    separate = picked_log_softmax([a, b], [pick_ab, pick_ba])
    values = joint(a, b)
    torch.testing.assert_close(values, separate)
    weights = (rand(3, seed=19), rand(2, seed=20))
    loss_joint = sum((v * w).sum() for v, w in zip(values, weights, strict=True))
    loss_separate = sum((v * w).sum() for v, w in zip(separate, weights, strict=True))
    grads_joint = torch.autograd.grad(loss_joint, (a, b))
    torch.testing.assert_close(grads_joint, torch.autograd.grad(loss_separate, (a, b)))
    # reading a stored a @ b.T instead of recomputing it changes nothing
    stored = (a @ b.T).detach()
    cached = transposed_picks(a, b, [pick_ab], [pick_ba], similarities=[stored], block_rows=block_rows)
    loss_cached = sum((v * w).sum() for v, w in zip(cached, weights, strict=True))
    torch.testing.assert_close(torch.autograd.grad(loss_cached, (a, b)), grads_joint)
    with pytest.raises(ValueError, match="picks_ab must read rows of a"):
        transposed_picks(a, b, [pick_ba], [pick_ab])
    with pytest.raises(ValueError, match=r"similarities must be \[6, 5\]"):
        transposed_picks(a, b, [pick_ab], [pick_ba], similarities=[stored.T])


def test_batched_picks_equal_per_pair_picks() -> None:
    # tensors [N, L, C] with picks naming their pair give what the pairs give one by one
    a, b = rand(2, 6, 3, seed=25), rand(2, 5, 3, seed=26)
    inv = torch.tensor([0.5, 2.0], dtype=F64)
    picks_ab = [Pick(0, 1, torch.tensor([4, 0]), torch.tensor([1, 3]), inv, pair=n) for n in range(2)]
    picks_ba = [Pick(1, 0, torch.tensor([2, 3]), torch.tensor([5, 0]), inv, pair=n) for n in range(2)]
    batched = transposed_picks(a, b, picks_ab, picks_ba)
    per_pair = [transposed_picks(a[n], b[n], [replace(picks_ab[n], pair=None)], [replace(picks_ba[n], pair=None)])
                for n in range(2)]
    torch.testing.assert_close(batched[0], torch.cat([v[0] for v in per_pair]))
    torch.testing.assert_close(batched[1], torch.cat([v[1] for v in per_pair]))
    general = picked_log_softmax([a, b], picks_ab + picks_ba)
    torch.testing.assert_close(torch.cat(general[:2]), batched[0])
    leaf_a, leaf_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    grads = torch.autograd.grad(sum(v.sum() for v in transposed_picks(leaf_a, leaf_b, picks_ab, picks_ba)),
                                (leaf_a, leaf_b))
    grads_general = torch.autograd.grad(sum(v.sum() for v in picked_log_softmax([leaf_a, leaf_b], picks_ab + picks_ba)),
                                        (leaf_a, leaf_b))
    torch.testing.assert_close(grads, grads_general)


@pytest.mark.parametrize("block_rows", [1, 2, None])
@pytest.mark.parametrize("cached", [False, True])
def test_transposed_picks_normalise_equals_picks_on_unit_rows(block_rows: int | None, cached: bool) -> None:
    # the cosine cycle's picks normalise inside: the same values and gradients as picks on F.normalize'd rows
    a, b = rand(2, 6, 3, seed=27), rand(2, 5, 3, seed=28)
    a[1, 2] = 0.0  # a zero row: the norm floor, as in F.normalize
    inv = torch.tensor([0.5, 2.0], dtype=F64)
    picks_ab = [Pick(0, 1, torch.tensor([4, 2]), torch.tensor([1, 3]), inv, pair=n) for n in range(2)]
    picks_ba = [Pick(1, 0, torch.tensor([2, 3]), torch.tensor([5, 0]), inv, pair=n) for n in range(2)]
    weights = (rand(4, seed=29), rand(4, seed=30))

    def run(normalise: bool) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        leaf_a, leaf_b = a.clone().requires_grad_(), b.clone().requires_grad_()
        x, y = (leaf_a, leaf_b) if normalise else (unit_rows(leaf_a), unit_rows(leaf_b))
        units = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        stored = [units[0][n] @ units[1][n].T for n in range(2)] if cached else None
        values = transposed_picks(x, y, picks_ab, picks_ba, similarities=stored, block_rows=block_rows,
                                  normalise=normalise)
        loss = sum((v * w).sum() for v, w in zip(values, weights, strict=True))
        return values, torch.autograd.grad(loss, (leaf_a, leaf_b))

    values, grads = run(True)
    expected_values, expected_grads = run(False)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)  # the same floats: unit rows made alike
    torch.testing.assert_close(grads, expected_grads)
    assert grads[0][1, 2].abs().sum() > 0  # the floored row's gradient is g / eps, not lost
    # gradcheck away from the floor, rows kept off it
    x, y = a[:1].clone().requires_grad_(), b[:1].clone().requires_grad_()
    one_ab, one_ba = [replace(picks_ab[0], pair=None)], [replace(picks_ba[0], pair=None)]
    assert gradcheck(lambda x, y: transposed_picks(x[0], y[0], one_ab, one_ba, block_rows=block_rows, normalise=True),
                     (x, y), fast_mode=True)


def test_transposed_picks_normalise_saves_no_unit_rows() -> None:
    # what backward keeps: the inputs themselves, their norms and the kept similarities, no copy of a or b
    a, b = rand(1, 64, 8, seed=31).requires_grad_(), rand(1, 48, 8, seed=32).requires_grad_()
    inv = torch.ones(3, dtype=F64)
    pick_ab = Pick(0, 1, torch.tensor([1, 5, 9]), torch.tensor([0, 2, 4]), inv, pair=0)
    pick_ba = Pick(1, 0, torch.tensor([0, 2, 4]), torch.tensor([1, 5, 9]), inv, pair=0)
    stored = [(torch.nn.functional.normalize(a[0], dim=-1) @ torch.nn.functional.normalize(b[0], dim=-1).T).detach()]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        values = transposed_picks(a, b, [pick_ab], [pick_ba], similarities=stored, normalise=True)
    assert sorted(tuple(t.shape) for t in saved) == [(1, 48, 1), (1, 48, 8), (1, 64, 1), (1, 64, 8), (64, 48)]
    large = {t.data_ptr() for t in saved if t.shape[-1] > 1}
    assert large == {a.data_ptr(), b.data_ptr(), stored[0].data_ptr()}
    sum(v.sum() for v in values).backward()
    assert a.grad is not None and b.grad is not None
