"""The batched dense path of the association (chosen by impl="auto" on small grids) equals the block-wise one;
association.py and dense.py import without a circle; the defaults come from one constant each."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import plca.losses
import plca.losses.association as association_module
import plca.losses.dense as dense
from plca.data.labels import IGNORE_INDEX
from plca.losses import (
    AssociationConfig,
    associate,
    association_loss,
    cross_entropy,
    lovasz_softmax,
    spatial_aggregate,
)
from plca.losses.association import DENSE_MAX_ENTRIES
from plca.losses.constants import DEFAULT_ALPHA


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


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, inside a function) for every `from X import ...` / `import X` of a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in nested))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in nested) for alias in node.names]
    return found


def test_no_import_circle_between_association_and_dense() -> None:
    """association.py imports dense.py at module level; dense.py needs nothing from association.py (the shared
    constants are in constants.py), so neither imports the other lazily inside a function."""
    losses = Path(plca.losses.__file__).parent
    dense_imports = _imports(losses / "dense.py")
    assert not [m for m, _ in dense_imports if m.startswith("plca.losses.association")]
    association_imports = _imports(losses / "association.py")
    assert ("plca.losses.dense", False) in association_imports
    assert not [m for m, lazy in association_imports if lazy and m.startswith("plca.")]


def test_defaults_are_the_spec_values_defined_once() -> None:
    """The public API keeps the spec's defaults (alpha=0.5, ignore_index=255), taken from the one constant each."""
    assert DEFAULT_ALPHA == 0.5 and IGNORE_INDEX == 255
    for fn in (association_loss, spatial_aggregate, associate, dense.dense_spatial_aggregate,
               dense.dense_association_loss):
        assert inspect.signature(fn).parameters["alpha"].default is DEFAULT_ALPHA, fn.__name__
    for fn in (association_loss, associate, lovasz_softmax, cross_entropy, dense.dense_association_loss):
        assert inspect.signature(fn).parameters["ignore_index"].default is IGNORE_INDEX, fn.__name__
    assert AssociationConfig().alpha == DEFAULT_ALPHA and AssociationConfig().ignore_index == IGNORE_INDEX
    assert association_module.KL_EPS == 1e-10 and association_module.LOG_CLAMP == -100.0
