"""ADVENT's normalised entropy (MinEnt's target term)."""

from __future__ import annotations

import math

import pytest
import torch

from plca.losses import entropy_loss, entropy_map

F64 = torch.float64


def test_entropy_map_is_shannon_entropy_over_log_classes() -> None:
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    p = logits.softmax(1)
    for n, i, j in ((0, 0, 0), (1, 2, 3), (0, 1, 2)):
        q = p[n, :, i, j]
        expected = -sum(float(x) * math.log(float(x)) for x in q) / math.log(5)
        assert entropy_map(logits)[n, i, j].item() == pytest.approx(expected, rel=1e-12)
    assert entropy_map(logits).shape == (2, 3, 4)


def test_entropy_is_one_for_uniform_and_near_zero_for_confident_pixels() -> None:
    uniform = torch.zeros(1, 19, 2, 2, dtype=F64)
    confident = torch.full((1, 19, 2, 2), -50.0, dtype=F64)
    confident[:, 3] = 50.0
    assert torch.allclose(entropy_map(uniform), torch.ones(1, 2, 2, dtype=F64))
    assert entropy_map(confident).max().item() < 1e-30
    both = torch.cat([uniform, confident])
    assert entropy_loss(both).item() == pytest.approx(0.5, rel=1e-12)  # the mean over every pixel


def test_a_gradient_step_on_entropy_sharpens_the_prediction() -> None:
    logits = torch.tensor([[[[1.0]], [[0.5]], [[0.0]]]], dtype=F64, requires_grad=True)
    loss = entropy_loss(logits)
    loss.backward()
    after = entropy_loss(logits.detach() - 0.1 * logits.grad)
    assert after.item() < loss.item()
    assert logits.grad[0, 0].item() < 0  # the leading class is pushed up


def test_entropy_map_names_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*\(5, 4\)"):
        entropy_map(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_map(torch.zeros(1, 1, 2, 2))
