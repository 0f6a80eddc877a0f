"""Adaptive label smoothing regulariser of PLCA (Eq 13).

Per pixel u = -(1/C) sum_c log softmax(z)_c, the cross-entropy to the uniform distribution. The loss
mean[stopgrad(u / tau - 1) * u] has the gradient of mean (u - tau)^2 / (2 tau): it sharpens pixels whose u is
below tau and smooths those above.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Threshold of Eq 13 used in the paper and the released code.
DEFAULT_TAU = 10.0


def adaptive_lsr(logits: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """Eq 13 over every pixel of logits [N, C, h, w] (class dim 1); no pixel is masked."""
    if logits.dim() < 2:
        raise ValueError(f"adaptive_lsr expects logits with a class dimension 1, got shape {tuple(logits.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    u = -torch.log_softmax(logits, dim=1).mean(dim=1)
    return ((u / tau - 1.0).detach() * u).mean()
