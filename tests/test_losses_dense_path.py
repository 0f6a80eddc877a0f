"""The batched dense path of the association (chosen by impl="auto" on small grids) equals the block-wise one."""

from __future__ import annotations

import pytest
import torch

from plca.losses import associate, spatial_aggregate
from plca.losses.association import DENSE_MAX_ENTRIES


def inputs(similarity: str, seed: int, n: int = 3, h: int = 4, w: int = 6, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    if similarity == "cosine":
        s = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).relu()
        t = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).relu()
    else:
        s = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).mul(3).softmax(1)
        t = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).mul(3).softmax(1)
    labels = torch.randint(0, 3, (n, h, w), generator=g)
    labels[0, 0, :3] = 255
    return s.requires_grad_(), t.requires_grad_(), labels


@pytest.mark.parametrize("similarity", ["cosine", "kl"])
@pytest.mark.parametrize("contrastive", [True, False])
@pytest.mark.parametrize("aggregate", [True, False])
def test_dense_and_blocked_agree(similarity: str, contrastive: bool, aggregate: bool) -> None:
    for seed in range(3):
        s, t, y = inputs(similarity, seed)
        kw = dict(similarity=similarity, contrastive=contrastive, aggregate_target=aggregate)
        a = associate(s, t, y, impl="blocked", **kw)
        b = associate(s, t, y, impl="dense", **kw)
        assert a.num_positive == b.num_positive and a.num_valid_source == b.num_valid_source
        assert torch.equal(a.positive, b.positive)
        assert torch.equal(a.target_index, b.target_index) and torch.equal(a.return_index, b.return_index)
        torch.testing.assert_close(a.loss, b.loss)
        if a.num_positive:
            ga = torch.autograd.grad(a.loss, (s, t))
            gb = torch.autograd.grad(b.loss, (s, t))
            for x, z in zip(ga, gb, strict=True):
                torch.testing.assert_close(x, z)


def test_dense_without_positives_is_a_zero_with_gradients() -> None:
    s, t, y = inputs("cosine", 0)
    y[:] = 255
    res = associate(s, t, y, impl="dense")
    assert res.num_positive == 0 and res.loss.item() == 0.0
    gs, gt = torch.autograd.grad(res.loss, (s, t))
    assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0
    assert bool((res.target_index == -1).all())


@pytest.mark.parametrize("similarity", ["cosine", "kl"])
def test_spatial_aggregate_paths_agree(similarity: str) -> None:
    x, _, _ = inputs(similarity, 4)
    torch.testing.assert_close(spatial_aggregate(x, similarity, 0.5, impl="dense"),
                               spatial_aggregate(x, similarity, 0.5, impl="blocked"))


def test_auto_picks_dense_only_on_small_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    import plca.losses.association as assoc

    calls = []
    real = assoc._associate_dense
    monkeypatch.setattr(assoc, "_associate_dense", lambda *a: calls.append(1) or real(*a))
    s, t, y = inputs("cosine", 1)
    associate(s, t, y, impl="auto")
    assert calls == [1]
    monkeypatch.setattr(assoc, "DENSE_MAX_ENTRIES", 10)
    associate(s, t, y, impl="auto")
    assert calls == [1]
    assert DENSE_MAX_ENTRIES == 1 << 20


def test_unknown_impl_is_refused() -> None:
    s, t, y = inputs("cosine", 0)
    with pytest.raises(ValueError, match="impl must be"):
        associate(s, t, y, impl="fast")
