"""Pseudo-label selection and ranking of target images: IntraDA's entropy ranking (Pan et al. CVPR 2020) here;
CBST/CRST's class-balanced selection and ClassMix's mixing will join it.

IntraDA scores every target training image by R, the mean over its pixels of ADVENT's normalised entropy map of
the stage-1 prediction (the released code takes the mean over C, H, W too, i.e. R / C: same order), optionally
times a rare-class factor, sorts the images by it (stable, ascending) and keeps the first int(N * lambda) as the
"easy" split (pseudo-labelled, the new source) and the rest as the "hard" split (the new target). All functions
are pure and keep the scores' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from plca.losses.entropy import entropy_map

#: Cityscapes trainIds IntraDA's code counts as rare: wall, fence, pole, traffic light, traffic sign, terrain,
#: rider, truck, bus, train, motorcycle (K = 11).
CITYSCAPES_RARE_CLASSES = (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)
#: IntraDA's easy fraction lambda (2975 Cityscapes train images -> 1993 easy, 982 hard).
EASY_RATIO = 0.67


def image_entropy(logits: Tensor, rare_classes: Sequence[int] | None = None) -> Tensor:
    """[N, C, H, W] logits -> [N] per-image score: the mean over H, W of `entropy_map` (IntraDA's R, not / C).

    With `rare_classes` (K ids, e.g. `CITYSCAPES_RARE_CLASSES`) each score is multiplied by ((K - k) / K + 0.5),
    k = how many of those classes occur in the image's `logits.argmax(1)` (IntraDA's "entropy normalisation":
    images showing rare classes rank as easier).
    """
    scores = entropy_map(logits).mean(dim=(1, 2))
    if rare_classes is None:
        return scores
    rare = torch.as_tensor(sorted(set(rare_classes)), dtype=torch.long, device=logits.device)
    if rare.numel() == 0:
        raise ValueError("image_entropy: rare_classes is empty; pass None for no rare-class factor")
    pred = logits.argmax(dim=1).flatten(1)  # [N, HW]
    present = (pred[:, :, None] == rare[None, None, :]).any(dim=1)  # [N, K]
    k = present.sum(dim=1).to(scores.dtype)
    num_rare = rare.numel()
    return scores * ((num_rare - k) / num_rare + 0.5)


def entropy_rank_split(scores: Tensor, ratio: float = EASY_RATIO) -> tuple[Tensor, Tensor]:
    """[N] scores -> (easy_idx, hard_idx): int64 indices in ascending score order, ties in input order.

    The sort is stable (as IntraDA's Python `sorted`); easy holds the first int(N * ratio) (a Python float
    product, floored: 2975 x 0.67 -> 1993), hard the rest.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"entropy_rank_split expects scores [N], got shape {tuple(scores.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"entropy_rank_split: ratio must be in [0, 1], got {ratio}")
    if torch.isnan(scores).any():
        raise ValueError("entropy_rank_split: scores contain NaN; they have no order")
    order = torch.sort(scores, stable=True).indices.to(torch.int64)
    num_easy = int(len(scores) * ratio)
    return order[:num_easy], order[num_easy:]
