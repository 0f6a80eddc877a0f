"""Entropy minimisation of target predictions: MinEnt of ADVENT (Vu et al., CVPR 2019, Sec. 3.1).

ADVENT's entropy map gives each pixel the Shannon entropy of its class distribution divided by log C, so it lies
in [0, 1] whatever the number of classes; MinEnt adds its mean over the target pixels, weighted by lambda_ent
(0.001 in ADVENT), to the source segmentation loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy_map(logits: Tensor) -> Tensor:
    """[N, C, H, W] logits -> [N, H, W] normalised entropy, -sum_c p_c log p_c / log C, of softmax over dim 1."""
    if logits.dim() != 4:
        raise ValueError(f"entropy_map expects logits [N, C, H, W], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"entropy_map needs at least 2 classes, got {num_classes}")
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1) / math.log(num_classes)


def entropy_loss(logits: Tensor) -> Tensor:
    """MinEnt's target term (ADVENT Sec. 3.1): the mean over all pixels of `entropy_map(logits)`."""
    return entropy_map(logits).mean()
