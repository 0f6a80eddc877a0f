"""Entropy minimisation of target predictions: MinEnt of ADVENT (Vu et al., CVPR 2019, Sec. 3.1).

ADVENT's entropy map gives each pixel the Shannon entropy of its class distribution divided by log C, so it lies
in [0, 1] whatever the number of classes; MinEnt adds its mean over the target pixels, weighted by lambda_ent
(0.001 in ADVENT), to the source segmentation loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def p_log_p(logits: Tensor, caller: str = "entropy_map") -> Tensor:
    """[N, C, H, W] logits -> [N, C, H, W] p_c log p_c, p = softmax over dim 1 (via log_softmax: no log 0).

    The one place the softmax and its log are taken for `entropy_map` and ADVENT's self-information map
    (`plca.losses.adversarial.self_information_map`); `caller` names the public function in shape errors.
    """
    if logits.dim() != 4:
        raise ValueError(f"{caller} expects logits [N, C, H, W], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"{caller} needs at least 2 classes, got {num_classes}")
    log_p = torch.log_softmax(logits, dim=1)
    return log_p.exp() * log_p


def entropy_map(logits: Tensor) -> Tensor:
    """[N, C, H, W] logits -> [N, H, W] normalised entropy, -sum_c p_c log p_c / log C, of softmax over dim 1.

    ADVENT Eq. 2; in [0, 1] whatever C.
    """
    return -p_log_p(logits).sum(dim=1) / math.log(logits.shape[1])


def entropy_loss(logits: Tensor) -> Tensor:
    """MinEnt's target term (ADVENT Sec. 3.1): the mean over all pixels of `entropy_map(logits)`."""
    return entropy_map(logits).mean()
