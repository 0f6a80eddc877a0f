"""Pixel-wise cross-entropy for segmentation, the source supervision CE_s of Eq 14."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the pixels whose label is not ignore_index; logits [N, C, H, W], labels [N, H, W].

    Unlike torch's mean (NaN when every pixel is ignored) this is then a zero that still backpropagates.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"cross_entropy expects logits [N, C, H, W] and labels [N, H, W], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    keep = labels != ignore_index
    bad = labels[keep & ((labels < 0) | (labels >= logits.shape[1]))]
    if bad.numel():
        raise ValueError(f"cross_entropy: labels {sorted(set(bad.tolist()))[:10]} outside [0, {logits.shape[1]}) "
                         f"and not ignore_index {ignore_index}")
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / keep.sum().clamp(min=1)
