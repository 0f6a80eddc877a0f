"""Pixel-level cycle association (PLCA, Kang et al. NeurIPS 2020): spatial aggregation, the cycle and its loss.

Equations as restored from the paper and the released code (project spec, plca.md): contrast normalisation
(Eq 5-6), spatial aggregation "SAGG" (Eq 7-8), similarities (Eq 1, 9), the cycle (Eq 2-3) and the association
loss (Eq 4 features, Eq 10 predictions), plus the Sim-PLCA ablation. The block-wise kernels of `chunked.py`
never build the L x L matrices of the dense form; by default (`cache_similarities`) the cosine ones are kept from
forward to backward in blocks, trading memory for time; with it off nothing of size L x L is held. The dense form
of the same formulas is `dense.py`: on small grids (`impl="auto"`) it is the faster one and runs instead.

Two identities keep it cheap. (1) With the CN statistics detached, softmax(CN(d)) = softmax(inv * d) with
inv = 1 / (std(d) + 1e-10): the mean is a constant shift. (2) For the same reason a per-row constant of d does
not change the softmax, so -KL(p || q) enters as p . log(q + 1e-10); the entropy term only matters for the
raw similarities of Sim-PLCA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from plca.data.labels import IGNORE_INDEX
from plca.losses.chunked import (
    Pick,
    aggregate,
    column_statistics,
    cosine_aggregate,
    picked_log_softmax,
    row_statistics,
    transposed_picks,
    unit_rows,
)
from plca.losses.constants import CN_EPS, DEFAULT_ALPHA, KL_EPS, LOG_CLAMP, NORM_EPS, SIMILARITIES, Similarity
from plca.losses.dense import dense_contrast_normalise, dense_similarity, dense_spatial_aggregate

__all__ = [
    "CN_EPS",
    "DEFAULT_ALPHA",
    "KL_EPS",
    "LOG_CLAMP",
    "NORM_EPS",
    "SIMILARITIES",
    "AssociationConfig",
    "AssociationResult",
    "Similarity",
    "associate",
    "association_loss",
    "downsample_labels",
    "spatial_aggregate",
]

#: Up to this many similarity entries per batch (N * Ls * Lt), `impl="auto"` computes the same formulas densely
#: and batched over the pairs: on small grids (the embedded pair's 8x16) the per-pair, per-block Python work of
#: the block-wise kernels costs more than the matrices, which are then small (2^20 float32 = 4 MiB each).
DENSE_MAX_ENTRIES = 1 << 20
#: On CUDA, up to this many: there the batched matrices beat the block-wise kernels at the paper's 92x92 grids too
#: (an H200: the paper's PLCA step 652 ms against 1,313 ms in TF32, 6.5 GiB more memory; reports/benchmarks.md,
#: "Training step on a GPU"), while on the CPU the block-wise kernels are the faster there. 2^29 entries (2 GiB a
#: float32 matrix) keeps full-resolution inference (a 128x256 grid: 2^30) block-wise.
DENSE_MAX_ENTRIES_CUDA = 1 << 29

Impl = Literal["auto", "blocked", "dense"]


def _dense(impl: str, entries: int, device: torch.device) -> bool:
    if impl not in ("auto", "blocked", "dense"):
        raise ValueError(f"impl must be 'auto', 'blocked' or 'dense', got {impl!r}")
    cap = DENSE_MAX_ENTRIES_CUDA if device.type == "cuda" else DENSE_MAX_ENTRIES
    return impl == "dense" or (impl == "auto" and entries <= cap)


@dataclass
class AssociationConfig:
    """Options of `association_loss` / `associate` (keyword arguments of the same names)."""

    similarity: Similarity = "cosine"
    #: Aggregate the target before associating (SAGG, Eq 7-8); off = "PLCA w/o SAGG".
    aggregate_target: bool = True
    alpha: float = DEFAULT_ALPHA
    ignore_index: int = IGNORE_INDEX
    #: True: PLCA's contrastive loss (Eq 4/10); False: Sim-PLCA.
    contrastive: bool = True
    #: Rows of the similarity matrix processed at once; None = about 2^21 entries per block.
    block_rows: int | None = None
    #: Keep the cosine similarity matrices (about L^2 / 2 for SAGG, L^2 for D_st) from forward to backward
    #: instead of recomputing them: about 20% faster, twice the memory of recomputing, still under half of the
    #: dense implementation at L = 92 x 92 (reports/benchmarks.md). False: the least memory. Predictions (kl)
    #: are cheap to recompute and never kept.
    cache_similarities: bool = True
    #: "blocked" (the kernels above), "dense" (batched L x L matrices) or "auto" (dense up to DENSE_MAX_ENTRIES on
    #: the CPU, DENSE_MAX_ENTRIES_CUDA on a GPU).
    impl: str = "blocked"


@dataclass
class AssociationResult:
    """The association loss of a batch and what the cycle found (all pairs together)."""

    loss: Tensor
    #: Source pixels whose cycle returned to a pixel of their own class.
    num_positive: int
    #: Source pixels with a label (!= ignore_index): those that start a cycle.
    num_valid_source: int
    #: [N, hs, ws] bool: the positives.
    positive: Tensor
    #: [N, hs, ws] int64: j*(i), flat index of the target pixel each source pixel associates with (-1 if ignored).
    target_index: Tensor
    #: [N, hs, ws] int64: i*(i), flat index of the source pixel the cycle returns to (-1 if ignored).
    return_index: Tensor

    @property
    def positive_rate(self) -> float:
        """Share of labelled source pixels that form label-consistent cycles."""
        return self.num_positive / max(self.num_valid_source, 1)


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def _full_precision(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32 (CN of 8464 near-equal cosines needs it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def spatial_aggregate(
    x: Tensor,
    similarity: Similarity = "cosine",
    alpha: float = DEFAULT_ALPHA,
    *,
    block_rows: int | None = None,
    cache_similarities: bool = False,
    impl: Impl = "blocked",
) -> Tensor:
    """SAGG (Eq 7-8): x~_j = (1 - alpha) x_j + alpha sum_k w_jk x_k over the pixels k of the same image.

    cosine: w_jk = softmax_k CN(cos(x_j, x_k)); kl: w_jk = softmax_k(-KL(x_j || x_k)), no CN (x are
    probabilities). The diagonal k = j is included; gradients flow through w. x: [N, C, h, w].
    cache_similarities (cosine): keep half of the L x L similarities for backward (faster training step); off
    by default here, as inference needs no backward. `associate` passes its own setting.
    """
    _check_similarity(similarity)
    _check_alpha(alpha)
    if x.dim() != 4:
        raise ValueError(f"spatial_aggregate expects [N, C, h, w], got shape {tuple(x.shape)}")
    if alpha == 0.0:
        return x
    n, c, h, w = x.shape
    # the block kernels call matrix products directly: keep autocast from lowering them to half precision
    with torch.autocast(x.device.type, enabled=False):
        if _dense(impl, n * (h * w) ** 2, x.device):
            return dense_spatial_aggregate(_full_precision(x), similarity, alpha).to(x.dtype)
        rows = _full_precision(x).flatten(2).transpose(1, 2)  # [N, L, C] view: one row per pixel
        if similarity == "cosine":
            out = cosine_aggregate(rows, None, alpha=alpha, block_rows=block_rows, cache=cache_similarities)
        else:
            # -KL(x_j || x_k) = x_j . log(x_k + eps) - (a constant per row j, which the softmax ignores)
            out = aggregate(rows, torch.log(rows + KL_EPS), rows, rows.new_ones(n, h * w), alpha=alpha,
                            block_rows=block_rows)
    return out.transpose(1, 2).reshape(n, c, h, w).to(x.dtype)


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """[N, H, W] integer labels to the feature grid `size` = (h, w), nearest (spec: how source labels meet the
    features); 255 stays 255. Shared by training (the source labels of a cycle) and its diagnostics."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _check_inputs(source: Tensor, target: Tensor, labels: Tensor) -> None:
    if source.dim() != 4 or target.dim() != 4:
        raise ValueError(f"source and target must be [N, C, h, w], got {tuple(source.shape)} and {tuple(target.shape)}")
    if source.shape[:2] != target.shape[:2]:
        raise ValueError(f"source and target must share N and C, got {tuple(source.shape)} and {tuple(target.shape)}")
    expected = (source.shape[0], *source.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"source_labels must be [N, h, w] = {list(expected)} like source, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"source_labels must be an integer tensor, got {labels.dtype}")


def associate(
    source: Tensor,
    target: Tensor,
    source_labels: Tensor,
    *,
    similarity: Similarity = "cosine",
    aggregate_target: bool = True,
    alpha: float = DEFAULT_ALPHA,
    ignore_index: int = IGNORE_INDEX,
    contrastive: bool = True,
    block_rows: int | None = None,
    cache_similarities: bool = True,
    impl: Impl = "blocked",
) -> AssociationResult:
    """Cycle association of each source image n with target image n, and the loss over all positives.

    source, target: [N, C, h, w] features (cosine) or probabilities (kl); source_labels [N, hs, ws] int.
    Contrastive (PLCA, Eq 4/10): -(1/|Pos|) sum_i [log P_st[i, j*] + log P_ts[j*, i*]], the sum clamped at
    -100 as the released code's BCE. Sim-PLCA: -(1/|Pos|) sum_i [D_st[i, j*] + D_ts[j*, i*]]. |Pos| counts the
    positives of all pairs; with none the loss is a zero that still backpropagates (zero gradients).
    block_rows, cache_similarities, impl: speed/memory knobs that do not change the result (see AssociationConfig;
    impl "blocked" never holds an L x L matrix, "dense" batches them, "auto" picks dense on small grids, and on a
    GPU up to the paper's).
    """
    _check_similarity(similarity)
    _check_alpha(alpha)
    _check_inputs(source, target, source_labels)
    n, ls, lt = source.shape[0], source.shape[2] * source.shape[3], target.shape[2] * target.shape[3]
    with torch.autocast(source.device.type, enabled=False):
        if _dense(impl, n * ls * lt, source.device):
            return _associate_dense(_full_precision(source), _full_precision(target), source_labels, similarity,
                                    aggregate_target, alpha, ignore_index, contrastive)
        return _associate(_full_precision(source), _full_precision(target), source_labels, similarity,
                          aggregate_target, alpha, ignore_index, contrastive, block_rows, cache_similarities)


def _associate_dense(
    source: Tensor,
    target: Tensor,
    source_labels: Tensor,
    similarity: Similarity,
    aggregate_target: bool,
    alpha: float,
    ignore_index: int,
    contrastive: bool,
) -> AssociationResult:
    """The same formulas with every [N, L, L] matrix materialised and batched over the pairs."""
    if aggregate_target:
        target = dense_spatial_aggregate(target, similarity, alpha)
    num_pairs, shape = source.shape[0], source.shape[2:]
    s_rows, t_rows = source.flatten(2).transpose(1, 2), target.flatten(2).transpose(1, 2)
    d_st = dense_similarity(s_rows, t_rows, similarity)
    d_ts = d_st.transpose(1, 2) if similarity == "cosine" else dense_similarity(t_rows, s_rows, similarity)
    log_p_st = torch.log_softmax(dense_contrast_normalise(d_st), dim=-1)
    log_p_ts = torch.log_softmax(dense_contrast_normalise(d_ts), dim=-1)
    with torch.no_grad():
        j_star = log_p_st.argmax(dim=-1)  # [N, Ls]
        i_star_of_j = log_p_ts.argmax(dim=-1)  # [N, Lt]
        i_star = torch.gather(i_star_of_j, 1, j_star)
        labels = source_labels.reshape(num_pairs, -1)
        valid = labels != ignore_index
        positive = valid & (torch.gather(labels, 1, i_star) == labels)
    if contrastive:
        at_st = torch.gather(log_p_st, 2, j_star.unsqueeze(-1)).squeeze(-1)
        at_ts = torch.gather(log_p_ts, 2, i_star_of_j.unsqueeze(-1)).squeeze(-1)
        per_pixel = -(at_st + torch.gather(at_ts, 1, j_star)).clamp(min=LOG_CLAMP)
    else:
        at_st = torch.gather(d_st, 2, j_star.unsqueeze(-1)).squeeze(-1)
        at_ts = torch.gather(d_ts, 2, i_star_of_j.unsqueeze(-1)).squeeze(-1)
        per_pixel = -(at_st + torch.gather(at_ts, 1, j_star))
    num_positive = int(positive.sum())
    if num_positive:
        loss = per_pixel[positive].sum() / num_positive
    else:
        loss = source[:0].sum() + target[:0].sum()
    minus_one = torch.full_like(j_star, -1)
    return AssociationResult(
        loss=loss,
        num_positive=num_positive,
        num_valid_source=int(valid.sum()),
        positive=positive.reshape(num_pairs, *shape),
        target_index=torch.where(valid, j_star, minus_one).reshape(num_pairs, *shape),
        return_index=torch.where(valid, i_star, minus_one).reshape(num_pairs, *shape),
    )


def _associate(
    source: Tensor,
    target: Tensor,
    source_labels: Tensor,
    similarity: Similarity,
    aggregate_target: bool,
    alpha: float,
    ignore_index: int,
    contrastive: bool,
    block_rows: int | None,
    cache: bool,
) -> AssociationResult:
    # the zero loss of a batch without positives attaches to the inputs, whatever the aggregation gave
    zero = source[:0].sum() + target[:0].sum()
    if aggregate_target:
        target = spatial_aggregate(target, similarity, alpha, block_rows=block_rows, cache_similarities=cache)

    num_pairs, shape = source.shape[0], source.shape[2:]
    labels = source_labels.reshape(num_pairs, -1)
    valid = labels != ignore_index
    target_index = torch.full_like(labels, -1, dtype=torch.long)
    return_index = torch.full_like(labels, -1, dtype=torch.long)
    positive = torch.zeros_like(valid)
    # All pairs at once, [N, L, C] views (one row per pixel): a single backward per kernel for the whole batch.
    s_rows, t_rows = source.flatten(2).transpose(1, 2), target.flatten(2).transpose(1, 2)
    # D_st = a_st @ b_st.T (+ a per-row constant for kl); D_ts = a_ts @ b_ts.T likewise.
    if similarity == "cosine":
        # unit rows for the cycle's statistics only: the loss normalises block by block from the rows themselves
        with torch.no_grad():
            a_st, b_st = unit_rows(s_rows), unit_rows(t_rows)
        a_ts, b_ts = b_st, a_st
    else:
        a_st, b_st = s_rows, torch.log(t_rows + KL_EPS)
        a_ts, b_ts = t_rows, torch.log(s_rows + KL_EPS)

    picks_st, picks_ts, kept = [], [], []
    # per positive: its pair, source pixel, target pixel j*, and which D_ts row term (over all pairs) it uses
    pos_pair, pos_i, pos_j, pos_term = [], [], [], []
    ts_terms = 0
    for n in range(num_pairs):
        # The cycle, without gradient. Only labelled source pixels start one; D_ts rows only where they land.
        starts = valid[n].nonzero().squeeze(1)
        stored = None
        if cache and similarity == "cosine":  # D_st kept whole: D_ts rows are its columns
            stored = a_st.new_empty(a_st.shape[1], b_st.shape[1])
            st = row_statistics(a_st[n].detach(), b_st[n].detach(), normalise=True, keep=stored,
                                block_rows=block_rows).take(starts)
        else:
            st = row_statistics(a_st[n].detach(), b_st[n].detach(), normalise=True, rows=starts,
                                block_rows=block_rows)
        landed, landed_slot = torch.unique(st.argmax, return_inverse=True)
        if stored is not None:
            ts = column_statistics(stored, landed, normalise=True, block_rows=block_rows)
        else:
            ts = row_statistics(a_ts[n].detach(), b_ts[n].detach(), normalise=True, rows=landed,
                                block_rows=block_rows)
        back = ts.argmax[landed_slot]
        target_index[n, starts] = st.argmax
        return_index[n, starts] = back
        keep = labels[n, back] == labels[n, starts]
        positive[n, starts[keep]] = True
        i_pos, j_pos = starts[keep], st.argmax[keep]
        if i_pos.numel() == 0:
            continue
        # Each distinct j* gets one D_ts row term; the positives that share it gather it.
        j_rows, j_slot = torch.unique(j_pos, return_inverse=True)
        st_pos, ts_pos = st.take(keep), ts.take(torch.searchsorted(landed, j_rows))
        ts_a, ts_b = (1, 0) if similarity == "cosine" else (2, 3)
        picks_st.append(Pick(0, 1, i_pos, j_pos, st_pos.inv_scale, st_pos.row_max, st_pos.log_sum, pair=n))
        picks_ts.append(Pick(ts_a, ts_b, j_rows, ts_pos.argmax, ts_pos.inv_scale, ts_pos.row_max, ts_pos.log_sum,
                             pair=n))
        kept.append(stored)
        pos_pair.append(torch.full_like(i_pos, n))
        pos_i.append(i_pos)
        pos_j.append(j_pos)
        pos_term.append(j_slot + ts_terms)
        ts_terms += j_rows.shape[0]

    num_positive = int(positive.sum())
    if num_positive and contrastive:
        # log softmax(CN(d)) at the pick = log softmax(inv * d): the mean of CN cancels, the scale is detached
        if similarity == "cosine":  # D_ts = D_st.T: one joint backward
            del a_st, b_st, a_ts, b_ts  # two L x C less before the loss's backward
            log_p_st, log_p_ts = transposed_picks(s_rows, t_rows, picks_st, picks_ts, normalise=True,
                                                  similarities=kept if cache else None, block_rows=block_rows)
        else:
            values = picked_log_softmax([a_st, b_st, a_ts, b_ts], picks_st + picks_ts, block_rows=block_rows)
            log_p_st, log_p_ts = torch.cat(values[: len(picks_st)]), torch.cat(values[len(picks_st) :])
        per_pixel = -(log_p_st + log_p_ts[torch.cat(pos_term)]).clamp(min=LOG_CLAMP)
        loss = per_pixel.sum() / num_positive
    elif num_positive:
        if similarity == "cosine":  # the raw similarities differentiated: unit rows with their gradient this time
            a_st, b_st = unit_rows(s_rows, keep_input=True), unit_rows(t_rows)
            a_ts, b_ts = b_st, a_st
        pair, i, j = torch.cat(pos_pair), torch.cat(pos_i), torch.cat(pos_j)
        back = return_index.reshape(num_pairs, -1)[pair, i]
        d_st = (a_st[pair, i] * b_st[pair, j]).sum(dim=1)  # D_st[i, j*]
        d_ts = (a_ts[pair, j] * b_ts[pair, back]).sum(dim=1)  # D_ts[j*, i*]
        if similarity == "kl":  # -KL keeps its entropy term here: the raw similarity is raised
            d_st = d_st - (s_rows[pair, i] * torch.log(s_rows[pair, i] + KL_EPS)).sum(dim=1)
            d_ts = d_ts - (t_rows[pair, j] * torch.log(t_rows[pair, j] + KL_EPS)).sum(dim=1)
        loss = -(d_st + d_ts).sum() / num_positive
    else:
        # a zero attached to the graph: backward works and every gradient is 0, even for non-finite inputs
        loss = zero
    return AssociationResult(
        loss=loss,
        num_positive=num_positive,
        num_valid_source=int(valid.sum()),
        positive=positive.reshape(num_pairs, *shape),
        target_index=target_index.reshape(num_pairs, *shape),
        return_index=return_index.reshape(num_pairs, *shape),
    )


def association_loss(
    source: Tensor,
    target: Tensor,
    source_labels: Tensor,
    *,
    similarity: Similarity = "cosine",
    aggregate_target: bool = True,
    alpha: float = DEFAULT_ALPHA,
    ignore_index: int = IGNORE_INDEX,
    contrastive: bool = True,
    block_rows: int | None = None,
    cache_similarities: bool = True,
    impl: Impl = "blocked",
) -> Tensor:
    """L_fass (Eq 4, similarity="cosine") or L_cass (Eq 10, "kl"); contrastive=False is Sim-PLCA.

    A scalar; see `associate` for the formula and for diagnostics.
    """
    return associate(
        source,
        target,
        source_labels,
        similarity=similarity,
        aggregate_target=aggregate_target,
        alpha=alpha,
        ignore_index=ignore_index,
        contrastive=contrastive,
        block_rows=block_rows,
        cache_similarities=cache_similarities,
        impl=impl,
    ).loss
