"""The dense form of the PLCA association formulas (project spec plca.md, Eq 1-10): every L x L matrix materialised.

Two uses. `association.py` runs these functions, batched over the image pairs, whenever `impl="dense"`, or
`impl="auto"` and the grid is small (up to `DENSE_MAX_ENTRIES` similarities; on a GPU up to
`DENSE_MAX_ENTRIES_CUDA`, the paper's grids included): the default pipeline's 8x16 feature grid takes this path in
training and evaluation. `dense_association_loss` is the plain autograd version, as in
the authors' released code, that the block-wise kernels of `association.py` are tested and benchmarked against.

Imports nothing from `association.py` (shared constants: `constants.py`), which imports this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX
from plca.losses.constants import CN_EPS, DEFAULT_ALPHA, KL_EPS, LOG_CLAMP, NORM_EPS, Similarity


def _flat(x: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, h*w, C]: one row per pixel."""
    return x.flatten(2).transpose(1, 2)


def dense_contrast_normalise(d: Tensor) -> Tensor:
    """CN over the last dim (Eq 5-6): mean and unbiased std of each row, both detached."""
    mean = d.mean(dim=-1, keepdim=True).detach()
    std = d.std(dim=-1, keepdim=True).detach()
    return (d - mean) / (std + CN_EPS)


def dense_similarity(x: Tensor, y: Tensor, similarity: Similarity) -> Tensor:
    """[N, Lx, C], [N, Ly, C] -> [N, Lx, Ly]: cos(x_i, y_j) or -KL(x_i || y_j)."""
    if similarity == "cosine":
        return F.normalize(x, dim=-1, eps=NORM_EPS) @ F.normalize(y, dim=-1, eps=NORM_EPS).transpose(1, 2)
    neg_entropy = (x * torch.log(x + KL_EPS)).sum(dim=-1, keepdim=True)
    return x @ torch.log(y + KL_EPS).transpose(1, 2) - neg_entropy


def dense_spatial_aggregate(x: Tensor, similarity: Similarity = "cosine", alpha: float = DEFAULT_ALPHA) -> Tensor:
    """SAGG (Eq 7-8) with the full L x L weight matrix."""
    n, c, h, w = x.shape
    rows = _flat(x)
    sim = dense_similarity(rows, rows, similarity)
    weights = torch.softmax(dense_contrast_normalise(sim) if similarity == "cosine" else sim, dim=-1)
    aggregated = (weights @ rows).transpose(1, 2).reshape(n, c, h, w)
    return (1.0 - alpha) * x + alpha * aggregated


def dense_association_loss(
    source: Tensor,
    target: Tensor,
    source_labels: Tensor,
    *,
    similarity: Similarity = "cosine",
    aggregate_target: bool = True,
    alpha: float = DEFAULT_ALPHA,
    ignore_index: int = IGNORE_INDEX,
    contrastive: bool = True,
) -> Tensor:
    """L_fass / L_cass (Eq 4, 10) or Sim-PLCA, every matrix dense."""
    if aggregate_target:
        target = dense_spatial_aggregate(target, similarity, alpha)
    s, t = _flat(source), _flat(target)
    d_st = dense_similarity(s, t, similarity)
    d_ts = d_st.transpose(1, 2) if similarity == "cosine" else dense_similarity(t, s, similarity)
    p_st = torch.softmax(dense_contrast_normalise(d_st), dim=-1)
    p_ts = torch.softmax(dense_contrast_normalise(d_ts), dim=-1)

    p_st_max, j_star = p_st.max(dim=-1)  # [N, Ls]
    p_ts_max, i_star_of_j = p_ts.max(dim=-1)  # [N, Lt]
    i_star = torch.gather(i_star_of_j, 1, j_star)
    labels = source_labels.flatten(1)
    positive = (labels != ignore_index) & (torch.gather(labels, 1, i_star) == labels)

    if contrastive:
        # as the released code: -log(P_st * P_ts), log clamped at -100 like BCE
        product = p_st_max * torch.gather(p_ts_max, 1, j_star)
        per_pixel = -torch.log(product).clamp(min=LOG_CLAMP)
    else:
        d_st_at = torch.gather(d_st, 2, j_star.unsqueeze(-1)).squeeze(-1)
        d_ts_at = torch.gather(d_ts, 2, i_star_of_j.unsqueeze(-1)).squeeze(-1)
        per_pixel = -(d_st_at + torch.gather(d_ts_at, 1, j_star))
    count = positive.sum()
    return (per_pixel * positive).sum() / count.clamp(min=1)
