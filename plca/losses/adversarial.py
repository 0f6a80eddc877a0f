"""Output-space adversarial adaptation: the discriminator's input map and its losses (AdaptSegNet, Tsai et al.
CVPR 2018; ADVENT's AdvEnt, Vu et al. CVPR 2019; IntraDA, Pan et al. CVPR 2020).

A discriminator D (`plca.models.fc_discriminator`) reads a per-pixel map of the segmenter's prediction (softmax
probabilities for AdaptSegNet, the self-information map for AdvEnt and IntraDA) and returns a map of logits.
Per level, with X_s / X_t the source / target maps:

- generator (segmenter) term: `adversarial_loss(D(X_t), SOURCE_LABEL)`, built with D's parameters not requiring
  grad, so it moves the segmenter only;
- discriminator term: `adversarial_loss(D(X_s.detach()), SOURCE_LABEL) / 2 +
  adversarial_loss(D(X_t.detach()), TARGET_LABEL) / 2`, which moves D only.

All functions are pure and keep the input's dtype (float64 in, float64 out).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from plca.losses.entropy import p_log_p

# The released codes (AdaptSegNet, ADVENT, IntraDA) label source 0 and target 1. The papers use the opposite
# (source 1, target 0): the same game with the discriminator's sign flipped.
SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0

GAN = Literal["bce", "ls"]


def self_information_map(logits: Tensor) -> Tensor:
    """[N, C, H, W] logits -> [N, C, H, W] weighted self-information -p_c log p_c / log C, p = softmax over dim 1.

    ADVENT Eq. 4 (the paper writes I = -p log p; the released code, `prob_2_entropy`, divides by log C, which is
    followed here), so its sum over C is ADVENT Eq. 2's entropy map, `entropy_map`. The discriminator input of
    AdvEnt and IntraDA.
    """
    return -p_log_p(logits, "self_information_map") / math.log(logits.shape[1])


def adversarial_loss(d_out: Tensor, label: float, gan: GAN = "bce") -> Tensor:
    """Mean over every entry of the discriminator's output map `d_out` (any shape) against the constant `label`.

    "bce" ("vanilla"): binary cross-entropy with logits, AdaptSegNet's adversarial loss L_adv and its
    discriminator loss L_d (the papers' -sum log D and per-position 2-class CE, as the released codes compute
    them: ADVENT's `bce_loss`, averaged over all entries). "ls": the least-squares GAN loss (Mao et al., LSGAN,
    ICCV 2017, Eq. 2; AdaptSegNet's --gan LS), mean (d - label)^2.
    """
    if gan == "bce":
        return F.binary_cross_entropy_with_logits(d_out, torch.full_like(d_out, label))
    if gan == "ls":
        return (d_out - label).square().mean()
    raise ValueError(f"adversarial_loss: unknown gan {gan!r}; expected 'bce' or 'ls'")
