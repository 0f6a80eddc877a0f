"""Pseudo-label selection and ranking of target images: IntraDA's entropy ranking (Pan et al. CVPR 2020) and the
self-training family's selection (CBST, Zou et al. ECCV 2018; CRST, Zou et al. ICCV 2019; TPLD, Shin et al. ECCV
2020; the project spec `self-training.md`); ClassMix's mixing will join them.

IntraDA scores every target training image by R, the mean over its pixels of ADVENT's normalised entropy map of
the stage-1 prediction (the released code takes the mean over C, H, W too, i.e. R / C: same order), optionally
times a rare-class factor, sorts the images by it (stable, ascending) and keeps the first int(N * lambda) as the
"easy" split (pseudo-labelled, the new source) and the rest as the "hard" split (the new target). All functions
are pure and keep the scores' dtype.

Self-training (below `entropy_rank_split`): probs [N, C, H, W] are softmax outputs of the target images, thresholds
[C] the class thresholds lambda_c, r_c = p_c / lambda_c. Everything is computed in the probs' dtype (float64 in,
float64 out); labels are int64 with `ignore_index` (255) for unlabelled pixels. Where the released code and the
paper differ, the code is the default and the paper's choice a keyword parameter (the spec's "Code vs paper").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX
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


# ---------------------------------------------------------------------------------------------------------------
# Self-training: CBST, CRST, TPLD
# ---------------------------------------------------------------------------------------------------------------

#: Inside the logs of CRST's LRENT keep rule (crst_seg.py `label_selection`).
LRENT_EPS = 1e-32

Policy = Literal["cb", "global"]


def _check_probs(probs: Tensor, caller: str) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 4:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"{caller} expects probs [N, C, H, W], got {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"{caller} expects floating probs, got dtype {probs.dtype}")


def _thresholds(probs: Tensor, thresholds: Tensor | Sequence[float], caller: str) -> Tensor:
    """`thresholds` as a [C] tensor in the probs' dtype and device; each must be > 0 (r = p / lambda)."""
    _check_probs(probs, caller)
    lam = torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device)
    if lam.shape != (probs.shape[1],):
        raise ValueError(f"{caller}: thresholds must be [C] = [{probs.shape[1]}], got {tuple(lam.shape)}")
    if not bool((lam > 0).all()):
        raise ValueError(f"{caller}: thresholds must be > 0, got {lam.tolist()}")
    return lam


def _ratios(probs: Tensor, thresholds: Tensor | Sequence[float], caller: str) -> Tensor:
    """r = p / lambda, [N, C, H, W] (the CBST code's `weighted_prob`)."""
    return probs / _thresholds(probs, thresholds, caller)[None, :, None, None]


def class_balanced_thresholds(probs: Tensor, portion: float, *, ds_rate: int = 4, policy: Policy = "cb",
                              cbst_mxnet: bool = False) -> Tensor:
    """[N, C, H, W] probs of one round's target images -> [C] class thresholds lambda_c (CBST's exp(-k_c)).

    CBST paper Algorithm 2 (determination of k_c) as the released code computes it (CRST `crst_seg.py`
    `val` + `kc_parameters`, kc-policy cb, kc-value conf): per image, pred = argmax p (ties: lower class) and
    conf = max p; for every class c the conf values of its pixels in row-major order, every `ds_rate`-th one
    from the first (the paper takes all: `ds_rate=1`); pooled over the images and sorted descending, n_c values,
    k = floor(n_c * portion) (a Python float product); lambda_c = the k-th largest (1-based) if k >= 1, else 1.0
    (also for a class never predicted: such a class is then kept only where p = 1).

    `policy="global"` is the ST baseline (Algorithm 1, kc-policy global): one lambda for every class, from the
    sampled values of all classes pooled. `cbst_mxnet=True` follows the CBST MXNet code (`solve_ST.py`
    `_val_impl`): each predicted class's list starts with a placeholder 0.0, so k = floor((n_c + 1) * portion)
    (global: 1 + C placeholder zeros in the pool), and a threshold of 0 becomes 1.0.
    The codes cast conf to float32; here it stays in the probs' dtype.
    """
    _check_probs(probs, "class_balanced_thresholds")
    cls, conf = class_confidence_samples(probs, ds_rate=ds_rate)
    return thresholds_from_samples(cls, conf, probs.shape[1], portion, policy=policy, cbst_mxnet=cbst_mxnet)


def class_confidence_samples(probs: Tensor, *, ds_rate: int = 4) -> tuple[Tensor, Tensor]:
    """[N, C, H, W] probs -> (predicted class [M] int64, its confidence max p [M]) of the pixels CBST's thresholds
    read: per image, for every class, every `ds_rate`-th of its pixels in row-major order from the first.
    Concatenating the samples of several batches gives those of all their images (a set too large to hold)."""
    _check_probs(probs, "class_confidence_samples")
    if isinstance(ds_rate, bool) or not isinstance(ds_rate, int) or ds_rate < 1:
        raise ValueError(f"class_balanced_thresholds: ds_rate must be an int >= 1, got {ds_rate!r}")
    num_classes = probs.shape[1]
    kept_cls, kept_conf = [], []
    for image in probs:  # one image at a time: the per-class lists are per image, then pooled
        pred = image.argmax(dim=0).flatten()
        conf = image.amax(dim=0).flatten()
        # group the pixels by class, keeping row-major order inside each class (stable sort), then take every
        # ds_rate-th of each group from its first: conf[pred == c][::ds_rate] for every c at once
        by_class = torch.sort(pred, stable=True).indices
        cls_sorted = pred[by_class]
        counts = torch.bincount(pred, minlength=num_classes)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(pred.numel(), device=pred.device) - starts[cls_sorted]
        keep = rank % ds_rate == 0
        kept_cls.append(cls_sorted[keep])
        kept_conf.append(conf[by_class][keep])
    all_cls = torch.cat(kept_cls) if kept_cls else torch.zeros(0, dtype=torch.long, device=probs.device)
    all_conf = torch.cat(kept_conf) if kept_conf else probs.new_zeros(0)
    return all_cls, all_conf


def thresholds_from_samples(cls: Tensor, conf: Tensor, num_classes: int, portion: float, *, policy: Policy = "cb",
                            cbst_mxnet: bool = False) -> Tensor:
    """[C] thresholds from `class_confidence_samples` (see `class_balanced_thresholds`), in conf's dtype."""
    if policy not in ("cb", "global"):
        raise ValueError(f"class_balanced_thresholds: unknown policy {policy!r}; expected 'cb' or 'global'")
    if not 0.0 <= portion <= 1.0:
        raise ValueError(f"class_balanced_thresholds: portion must be in [0, 1], got {portion}")
    all_cls, all_conf = cls, conf

    def kth_largest(values: Tensor, placeholders: int) -> float | Tensor:
        if placeholders:  # CBST-MXNet: the lists start with 0.0 (np.append onto np.float32(0))
            values = torch.cat([values.new_zeros(placeholders), values])
        k = math.floor(values.numel() * portion)
        if k < 1:
            return 1.0
        value = torch.sort(values, descending=True).values[k - 1]
        if cbst_mxnet and value == 0:  # solve_ST.py: cls_thresh[cls_thresh == 0] = 1.0
            return 1.0
        return value

    out = conf.new_ones(num_classes)
    if policy == "global":
        out[:] = kth_largest(all_conf, 1 + num_classes if cbst_mxnet else 0)
        return out
    for c in range(num_classes):
        values = all_conf[all_cls == c]
        if values.numel():  # a class never predicted keeps 1.0 (no placeholder list in the MXNet code either)
            out[c] = kth_largest(values, 1 if cbst_mxnet else 0)
    return out


def hard_pseudo_labels(probs: Tensor, thresholds: Tensor | Sequence[float], *, ignore_index: int = IGNORE_INDEX,
                       strict: bool = False) -> Tensor:
    """[N, C, H, W] probs, [C] thresholds -> [N, H, W] int64 CBST pseudo-labels.

    The closed-form solution of CBST's L_CB over y-hat (paper; code `label_selection`, kc-policy cb):
    argmax_c r_c (ties: lower class) where max_c r_c >= 1, else `ignore_index`. The code keeps r = 1 (a pixel
    exactly at its threshold); `strict=True` is the paper's p > lambda (r > 1).
    """
    r = _ratios(probs, thresholds, "hard_pseudo_labels")
    labels = r.argmax(dim=1)
    r_max = r.amax(dim=1)
    keep = r_max > 1 if strict else r_max >= 1
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))


def soft_pseudo_labels(probs: Tensor, thresholds: Tensor | Sequence[float], alpha: float, *,
                       ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """[N, C, H, W] probs, [C] thresholds -> (soft [N, C, H, W], labels [N, H, W] int64): CRST's LRENT labels.

    CRST paper, label-entropy regularisation (LRENT) solved for y-hat; code `label_selection` with
    lr_weight_ent = `alpha` > 0 (0.25 in lrent.sh): y-hat_c = r_c^(1/alpha) / sum_k r_k^(1/alpha) (computed as
    softmax(log r / alpha), the same values without overflow); labels = argmax_c y-hat_c. A pixel is kept iff
    sum_c [-y-hat_c log(p_c + 1e-32) + alpha y-hat_c log(y-hat_c + 1e-32)] < sum_c -y-hat_c log(lambda_c + 1e-32);
    a dropped pixel gets `ignore_index` and a soft label of zeros (the code's loader zeroes it; the loss reads a
    zero soft label as ignored).
    """
    if not alpha > 0:
        raise ValueError(f"soft_pseudo_labels: alpha must be > 0, got {alpha}")
    lam = _thresholds(probs, thresholds, "soft_pseudo_labels")
    r = probs / lam[None, :, None, None]
    soft = torch.softmax(torch.log(r) / alpha, dim=1)
    reg_score = (-soft * torch.log(probs + LRENT_EPS) + alpha * soft * torch.log(soft + LRENT_EPS)).sum(dim=1)
    sel_score = (-soft * torch.log(lam + LRENT_EPS)[None, :, None, None]).sum(dim=1)
    keep = reg_score < sel_score
    labels = torch.where(keep, soft.argmax(dim=1), torch.full_like(keep, ignore_index, dtype=torch.long))
    return soft * keep[:, None].to(soft.dtype), labels


def mining_classes(probs: Tensor, *, mine_port: float = 1e-3, rare_cls_num: int = 3) -> tuple[Tensor, Tensor]:
    """[N, C, H, W] probs -> (rare_ids, mine_ids), int64, classes in ascending share (stable: ties, lower class).

    CRST/CBST patch mining (code `kc_parameters`): counts = argmax pixels per class over all the images, share =
    counts / total; mine_ids = the classes with share < `mine_port` (CRST's retraining centres a crop on one of
    them with chance 0.8); rare_ids = the `rare_cls_num` smallest shares (saved, unused by CRST). The code's
    np.argsort is not stable; a stable sort is used here so that ties (e.g. classes never predicted) come in
    class order.
    """
    _check_probs(probs, "mining_classes")
    num_classes = probs.shape[1]
    counts = torch.bincount(probs.argmax(dim=1).flatten(), minlength=num_classes).to(probs.dtype)
    return mining_from_counts(counts, mine_port=mine_port, rare_cls_num=rare_cls_num)


def mining_from_counts(counts: Tensor, *, mine_port: float = 1e-3, rare_cls_num: int = 3) -> tuple[Tensor, Tensor]:
    """`mining_classes` from the argmax pixel counts per class [C] (summed over batches of a set too large to
    hold)."""
    if rare_cls_num < 0:
        raise ValueError(f"mining_classes: rare_cls_num must be >= 0, got {rare_cls_num}")
    share = counts / counts.sum().clamp(min=1)
    order = torch.sort(share, stable=True).indices.to(torch.int64)
    num_mine = int((share < mine_port).sum())
    return order[:rare_cls_num], order[:num_mine]


def _window_sum(x: Tensor, window: int) -> Tensor:
    """Sum of `x` [N, C, H, W] over the window x window neighbourhood of each pixel (outside the image: 0)."""
    pad = window // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    height, width = x.shape[-2:]
    total = torch.zeros_like(x)
    for dy in range(window):
        for dx in range(window):
            total = total + padded[..., dy:dy + height, dx:dx + width]
    return total


def vote_densify(probs: Tensor, thresholds: Tensor | Sequence[float], labels: Tensor | None = None, *,
                 window: int = 3, alpha: float = 0.7, iterations: int = 3, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """[N, C, H, W] probs, [C] thresholds, [N, H, W] labels (None: `hard_pseudo_labels`) -> densified labels.

    TPLD phase 1, voting-based densification (Shin et al. ECCV 2020; no code was released, the details
    are the spec's reading, marked "ours" there). `iterations` times, synchronously (each pass reads the labels
    of the previous one): for each pixel still at `ignore_index`, take the two classes with the largest r (ties:
    lower class); pooled_c = the mean of r_c over the pixels of its window x window neighbourhood (ours: 3 x 3,
    cut at the image border) already labelled c (0 if none); v_c = (1 - alpha) r_c + alpha pooled_c (ours:
    alpha weighs the pooled term); the pixel takes the candidate with the larger v (tie: the first, larger-r one)
    if that v >= 1. Labelled pixels never change.
    """
    r = _ratios(probs, thresholds, "vote_densify")
    num, num_classes, height, width = r.shape
    if num_classes < 2:
        raise ValueError(f"vote_densify needs at least 2 classes, got {num_classes}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"vote_densify: window must be an odd int >= 1, got {window!r}")
    if iterations < 0:
        raise ValueError(f"vote_densify: iterations must be >= 0, got {iterations}")
    if labels is None:
        labels = hard_pseudo_labels(probs, thresholds, ignore_index=ignore_index)
    else:
        labels = torch.as_tensor(labels, device=probs.device).to(torch.int64)
        if labels.shape != (num, height, width):
            raise ValueError(f"vote_densify: labels must be [N, H, W] = {[num, height, width]}, "
                             f"got {tuple(labels.shape)}")
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))]
        if bad.numel():
            raise ValueError(f"vote_densify: labels {sorted(set(bad.tolist()))[:10]} outside [0, {num_classes}) "
                             f"and not ignore_index {ignore_index}")
    top2 = torch.sort(r, dim=1, descending=True, stable=True).indices[:, :2]  # [N, 2, H, W], ties: lower class
    r_top = r.gather(1, top2)
    for _ in range(iterations):
        unlabelled = labels == ignore_index
        if not bool(unlabelled.any()):
            break
        onehot = torch.zeros_like(r).scatter_(1, labels.clamp(0, num_classes - 1)[:, None], 1.0)
        onehot = onehot * (~unlabelled)[:, None].to(r.dtype)
        count = _window_sum(onehot, window)
        pooled = torch.where(count > 0, _window_sum(r * onehot, window) / count.clamp(min=1), torch.zeros_like(r))
        votes = (1 - alpha) * r_top + alpha * pooled.gather(1, top2)
        second = votes[:, 1] > votes[:, 0]
        best = torch.where(second, votes[:, 1], votes[:, 0])
        candidate = torch.where(second, top2[:, 1], top2[:, 0])
        labels = torch.where(unlabelled & (best >= 1), candidate, labels)
    return labels


def image_confidence(probs: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """[N, C, H, W] probs, [C] thresholds -> [N] TPLD image confidence (phase 2, the paper's conf_t).

    conf = (1/K') sum over the K' classes predicted (argmax) in the image of (N*_c / N_c) / lambda_c, N_c = the
    image's argmax pixels of c, N*_c = those of them with p_c >= lambda_c (>=: the CBST code's r >= 1).
    """
    lam = _thresholds(probs, thresholds, "image_confidence")
    if probs.shape[2] * probs.shape[3] == 0:
        raise ValueError(f"image_confidence: empty images {tuple(probs.shape)}")
    pred = probs.argmax(dim=1, keepdim=True)
    onehot = torch.zeros_like(probs).scatter_(1, pred, 1.0)
    n_c = onehot.sum(dim=(2, 3))
    n_star = (onehot * (probs >= lam[None, :, None, None]).to(probs.dtype)).sum(dim=(2, 3))
    present = n_c > 0
    ratio = torch.where(present, n_star / n_c.clamp(min=1) / lam[None], torch.zeros_like(n_c))
    return ratio.sum(dim=1) / present.sum(dim=1).to(probs.dtype)


def split_easy_hard(confidence: Tensor, q: float = 0.3) -> Tensor:
    """[N] image confidences -> [N] bool, True = easy: TPLD phase 2's split (the top `q` of the images).

    The images sorted by confidence, descending and stable (ties in input order); the first floor(q * N)
    (a Python float product) are easy, the rest hard.
    """
    confidence = torch.as_tensor(confidence)
    if confidence.dim() != 1:
        raise ValueError(f"split_easy_hard expects confidence [N], got shape {tuple(confidence.shape)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"split_easy_hard: q must be in [0, 1], got {q}")
    if confidence.is_floating_point() and bool(torch.isnan(confidence).any()):
        raise ValueError("split_easy_hard: confidence contains NaN; it has no order")
    order = torch.sort(confidence, descending=True, stable=True).indices
    easy = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    easy[order[:math.floor(len(confidence) * q)]] = True
    return easy


def full_pseudo_labels(probs: Tensor, thresholds: Tensor | Sequence[float], gamma: float = 2.0) -> Tensor:
    """[N, C, H, W] probs, [C] thresholds -> [N, C, H, W] TPLD phase 2 full pseudo-labels of an easy image.

    Every pixel gets a target: one-hot(argmax_c r_c) (ties: lower class) where max_c r_c >= 1, else r_c^gamma
    for every class (not renormalised; the spec's reading, gamma = 2).
    """
    r = _ratios(probs, thresholds, "full_pseudo_labels")
    confident = r.amax(dim=1, keepdim=True) >= 1
    onehot = torch.zeros_like(r).scatter_(1, r.argmax(dim=1, keepdim=True), 1.0)
    return torch.where(confident, onehot, r.pow(gamma))
