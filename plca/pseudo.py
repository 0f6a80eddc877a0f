"""Pseudo-label selection and ranking of target images: IntraDA's entropy ranking (Pan et al. CVPR 2020) and the
self-training family's selection (CBST, Zou et al. ECCV 2018; CRST, Zou et al. ICCV 2019; TPLD, Shin et al. ECCV
2020; the project spec `self-training.md`); and the mean teacher's ClassMix and strong augmentation (DACS, Tranheden
et al. WACV 2021; DAFormer, Hoyer et al. CVPR 2022; PGPC; the project spec `mean-teacher.md`).

IntraDA scores every target training image by R, the mean over its pixels of ADVENT's normalised entropy map of
the stage-1 prediction (the released code takes the mean over C, H, W too, i.e. R / C: same order), optionally
times a rare-class factor, sorts the images by it (stable, ascending) and keeps the first int(N * lambda) as the
"easy" split (pseudo-labelled, the new source) and the rest as the "hard" split (the new target). All functions
are pure and keep the scores' dtype.

Self-training (below `entropy_rank_split`): probs [N, C, H, W] are softmax outputs of the target images, thresholds
[C] the class thresholds lambda_c, r_c = p_c / lambda_c. Everything is computed in the probs' dtype (float64 in,
float64 out); labels are int64 with `ignore_index` (255) for unlabelled pixels. Where the released code and the
paper differ, the code is the default and the paper's choice a keyword parameter (the spec's "Code vs paper").

Mean teacher (below `full_pseudo_labels`): `sample_mix_classes` draws the source classes to paste, `class_mix_mask`
and `class_mix` mix images, labels and weights, and `strong_augment` (kornia 0.5.8's ColorJitter and
gaussian_blur2d, re-implemented in torch: `color_jitter`, `gaussian_blur`) augments the mixed images. Every
random draw comes from the torch.Generator passed in, so a step is reproducible.
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
from plca.models.output import class_argmax

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
    pred = class_argmax(logits).flatten(1)  # [N, HW]
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
        pred = class_argmax(image, 0).flatten()
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
    labels = class_argmax(r)
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
    labels = torch.where(keep, class_argmax(soft), torch.full_like(keep, ignore_index, dtype=torch.long))
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
    counts = torch.bincount(class_argmax(probs).flatten(), minlength=num_classes).to(probs.dtype)
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


def location_class_counts(labels: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """[N, H, W] integer labels -> [C, H, W] int64: how many of the N labels show class c at each location
    (`ignore_index` counted nowhere). Summed over batches, the counts CBST's spatial prior is made from."""
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"location_class_counts expects integer labels [N, H, W], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    n, height, width = labels.shape
    flat = labels.reshape(n, -1).to(torch.int64)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"location_class_counts: label values {sorted(set(flat[bad].tolist()))[:10]} outside "
                         f"[0, {num_classes}) and not {ignore_index}")
    position = torch.arange(height * width, device=labels.device).expand(n, -1)
    index = (flat * (height * width) + position)[valid]
    counts = torch.bincount(index, minlength=num_classes * height * width)
    return counts.reshape(num_classes, height, width)


def spatial_prior(counts: Tensor, *, sigma: float) -> Tensor:
    """CBST-SP's spatial prior q_n(c) (CBST, Zou et al. ECCV 2018, Eq. 8): [C, H, W] float counts of source pixels
    of each class at each location (`location_class_counts`) -> [C, H, W] in their dtype.

    The counts are smoothed by a Gaussian of `sigma` pixels (separable, truncated at 3 sigma, border values
    repeated; sigma = 0: no smoothing) and normalised over classes at each location, so sum_c q_n(c) = 1 (1/C
    where no source pixel was ever labelled). The paper counts class frequencies per location and smooths them
    with a 70 x 70 Gaussian kernel; the released code loads a distributed prior (prior_array.mat) without its
    recipe, so the sigma, the border handling and the normalisation are our reading.
    """
    if counts.dim() != 3 or not counts.is_floating_point():
        raise ValueError(f"spatial_prior expects float counts [C, H, W], got {counts.dtype} {tuple(counts.shape)}")
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"spatial_prior: sigma must be a finite number >= 0, got {sigma}")
    if bool((counts < 0).any()):
        raise ValueError("spatial_prior: counts must be >= 0")
    smooth = counts
    radius = math.ceil(3 * sigma)
    if sigma > 0 and radius > 0:
        x = torch.arange(-radius, radius + 1, dtype=counts.dtype, device=counts.device)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        c = counts.shape[0]
        smooth = F.pad(counts[None], (radius, radius, 0, 0), mode="replicate")
        smooth = F.conv2d(smooth, kernel.expand(c, 1, 1, -1), groups=c)
        smooth = F.pad(smooth, (0, 0, radius, radius), mode="replicate")
        smooth = F.conv2d(smooth, kernel.expand(c, 1, -1)[..., None], groups=c)[0]
    total = smooth.sum(dim=0, keepdim=True)
    uniform = torch.full_like(smooth, 1.0 / smooth.shape[0])
    return torch.where(total > 0, smooth / total.clamp(min=torch.finfo(smooth.dtype).tiny), uniform)


def apply_spatial_prior(probs: Tensor, prior: Tensor) -> Tensor:
    """[N, C, H, W] probs times a [C, h, w] spatial prior (`spatial_prior`) resized bilinearly to H x W: CBST-SP's
    p_n(c) q_n(c) (CBST Eq. 8), not renormalised, which the released code thresholds and labels as it would the
    probabilities. Computed in the probs' dtype."""
    _check_probs(probs, "apply_spatial_prior")
    if prior.dim() != 3 or prior.shape[0] != probs.shape[1]:
        raise ValueError(f"apply_spatial_prior: the prior must be [C = {probs.shape[1]}, h, w], got "
                         f"{tuple(prior.shape)}")
    q = prior.to(device=probs.device, dtype=probs.dtype)[None]
    if tuple(q.shape[-2:]) != tuple(probs.shape[-2:]):
        q = F.interpolate(q, size=tuple(probs.shape[-2:]), mode="bilinear", align_corners=False)
    return probs * q


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
    # the two classes with the largest r, ties to the lower class (a stable descending sort's first two)
    top1 = class_argmax(r)
    top2 = torch.stack([top1, class_argmax(r.scatter(1, top1[:, None], -math.inf))], dim=1)  # [N, 2, H, W]
    r_top = r.gather(1, top2)
    # Only the two candidates' pooled ratios matter: per window offset, each candidate's r at that neighbour
    # ([offsets, N, 2, H, W]). Summed offset by offset in the same order as a window sum over every class, with
    # zeros where a neighbour does not count, they give the same floats at a 1/C of the work.
    pad = window // 2
    r_pad = F.pad(r, (pad, pad, pad, pad))  # outside the image: never labelled
    offsets = [(dy, dx) for dy in range(window) for dx in range(window)]
    neighbour_r = torch.stack([r_pad[..., dy:dy + height, dx:dx + width].gather(1, top2) for dy, dx in offsets])
    for _ in range(iterations):
        unlabelled = labels == ignore_index
        if not bool(unlabelled.any()):
            break
        labels_pad = F.pad(labels, (pad, pad, pad, pad), value=ignore_index)
        count = torch.zeros_like(r_top)
        total = torch.zeros_like(r_top)
        for k, (dy, dx) in enumerate(offsets):  # a neighbour counts when labelled with the candidate class
            same = labels_pad[:, None, dy:dy + height, dx:dx + width] == top2
            count = count + same.to(r.dtype)
            total = total + torch.where(same, neighbour_r[k], torch.zeros_like(r_top))
        pooled = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(r_top))
        votes = (1 - alpha) * r_top + alpha * pooled
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
    pred = class_argmax(probs)[:, None]
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
    onehot = torch.zeros_like(r).scatter_(1, class_argmax(r)[:, None], 1.0)
    return torch.where(confident, onehot, r.pow(gamma))


# ---------------------------------------------------------------------------------------------------------------
# ClassMix and the strong augmentation of the mean teacher (DACS, DAFormer, PGPC; kornia 0.5.8)
# ---------------------------------------------------------------------------------------------------------------


def class_mix_mask(label: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
    """label [H, W] (any shape), classes 1-D -> int64 mask of the label's shape: 1 where label is in `classes`.

    ClassMix's M = [y_src in chosen] (DACS/DAFormer `generate_class_mask`); 255 counts as a class like any other.
    """
    label = torch.as_tensor(label)
    chosen = torch.as_tensor(classes, device=label.device).reshape(-1).to(label.dtype)
    return torch.isin(label, chosen).to(torch.int64)


def class_mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """mask * source + (1 - mask) * target, in the source's dtype (DAFormer `one_mix`).

    `mask` [H, W] (or any shape that broadcasts as is, e.g. [1, H, W] or [B, 1, H, W]) is used as is for labels
    [H, W] / [B, H, W] and weights, and broadcast over the channels of images [C, H, W] / [B, C, H, W]; a [B, H, W]
    mask with [B, C, H, W] images gets a channel axis. Labels stay int64 (a pasted 255 stays 255), weights float.
    """
    source = torch.as_tensor(source)
    mask = torch.as_tensor(mask, device=source.device)
    if mask.dim() >= 3 and mask.dim() == source.dim() - 1:
        mask = mask.unsqueeze(-3)
    m = mask.to(source.dtype)
    return m * source + (1 - m) * torch.as_tensor(target, device=source.device).to(source.dtype)


def sample_mix_classes(labels: Tensor, *, generator: torch.Generator | None = None,
                       batch_union: bool = True) -> list[Tensor]:
    """labels [B, 1, H, W] (or [B, H, W]) source labels -> per image a 1-D tensor of the classes to paste.

    Candidates: the sorted unique values, 255 included, of the whole batch (`batch_union`, DAFormer/PGPC
    `get_class_masks`: every image draws from the batch union) or of image i alone (False: DACS). Of the n
    candidates k = ceil(n / 2) are drawn without replacement: `torch.randperm(n, generator=generator)[:k]`, in
    the order drawn (np.random.choice(n, k, replace=False) in the release).
    """
    labels = torch.as_tensor(labels)
    if labels.dim() not in (3, 4) or (labels.dim() == 4 and labels.shape[1] != 1):
        raise ValueError(f"sample_mix_classes expects labels [B, 1, H, W] or [B, H, W], got {tuple(labels.shape)}")
    device = generator.device if generator is not None else torch.device("cpu")
    union = torch.unique(labels) if batch_union else None
    chosen = []
    for image in labels:
        candidates = union if union is not None else torch.unique(image)
        n = candidates.numel()
        pick = torch.randperm(n, generator=generator, device=device)[:(n + 1) // 2]
        chosen.append(candidates[pick.to(candidates.device)])
    return chosen


def blur_kernel_size(size: int) -> int:
    """Gaussian kernel size along an axis of `size` pixels: ceil(0.1 * size), minus 1 if even (DAFormer
    `gaussian_blur`: 64 -> 7, 128 -> 13, 512 -> 51; at least 1)."""
    if size < 1:
        raise ValueError(f"blur_kernel_size: size must be >= 1, got {size}")
    k = math.ceil(0.1 * size)  # a float product, as the release's np.ceil(0.1 * n)
    return k - 1 if k % 2 == 0 else k


def _gaussian_kernels(size: int, sigma: Tensor) -> Tensor:
    """[B] sigmas -> [B, size] normalised 1-D kernels exp(-(x - size // 2)^2 / (2 sigma^2)) (kornia 0.5.8)."""
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    kernel = torch.exp(-x[None] ** 2 / (2 * sigma[:, None] ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(img: Tensor, sigma: float | Tensor) -> Tensor:
    """img [B, C, H, W] float -> blurred, same dtype: kornia 0.5.8 `gaussian_blur2d` with reflect padding.

    Kernel size per axis `blur_kernel_size` of that axis (51 x 51 for 512 x 512); `sigma` a float for every
    image or a [B] tensor, one per image (DAFormer draws one per image). Computed separably (the 2-D kernel is
    the outer product of the 1-D ones, and reflect padding is separable too).
    """
    if img.dim() != 4 or not img.is_floating_point():
        raise ValueError(f"gaussian_blur expects a float image [B, C, H, W], got {img.dtype} {tuple(img.shape)}")
    batch, channels, height, width = img.shape
    sig = torch.as_tensor(sigma, dtype=img.dtype, device=img.device).reshape(-1)
    if sig.numel() == 1:
        sig = sig.expand(batch)
    if sig.numel() != batch:
        raise ValueError(f"gaussian_blur: sigma needs 1 or B = {batch} values, got {sig.numel()}")
    if not bool((sig > 0).all()):
        raise ValueError(f"gaussian_blur: sigma must be > 0, got {sig.tolist()}")
    x = img.reshape(1, batch * channels, height, width)
    ky, kx = blur_kernel_size(height), blur_kernel_size(width)
    kernel_x = _gaussian_kernels(kx, sig).repeat_interleave(channels, dim=0)  # [B*C, kx]
    kernel_y = _gaussian_kernels(ky, sig).repeat_interleave(channels, dim=0)
    x = F.conv2d(F.pad(x, (kx // 2, kx // 2, 0, 0), mode="reflect"), kernel_x[:, None, None, :],
                 groups=batch * channels)
    x = F.conv2d(F.pad(x, (0, 0, ky // 2, ky // 2), mode="reflect"), kernel_y[:, None, :, None],
                 groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def rgb_to_hsv(image: Tensor, eps: float = 1e-6) -> Tensor:
    """[*, 3, H, W] RGB in [0, 1] -> HSV with H in [0, 2 pi) radians, S and V in [0, 1] (kornia 0.5.8's formulas:
    S = (max - min) / (max + eps); ties for the maximum go to R, then G, then B; grey pixels get H = 0)."""
    maxc, _ = image.max(dim=-3)
    minc, _ = image.min(dim=-3)
    is_max = image == maxc.unsqueeze(-3)
    first_max = ((is_max.cumsum(dim=-3) == 1) & is_max).to(torch.uint8).argmax(dim=-3, keepdim=True)
    delta = maxc - minc
    s = delta / (maxc + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc.unsqueeze(-3) - image).unbind(dim=-3)
    h = torch.stack([bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc], dim=-3)
    h = torch.gather(h, -3, first_max).squeeze(-3) / delta
    h = 2 * math.pi * ((h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(image: Tensor) -> Tensor:
    """[*, 3, H, W] HSV (H in radians, any real value: read mod 2 pi) -> RGB (kornia 0.5.8's formulas)."""
    h = image[..., 0, :, :] / (2 * math.pi)
    s, v = image[..., 1, :, :], image[..., 2, :, :]
    hi = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    hi = hi.long()
    indices = torch.stack([hi, hi + 6, hi + 12], dim=-3)
    table = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=-3)
    return torch.gather(table, -3, indices)


def _per_image(factor: Tensor, img: Tensor) -> Tensor:
    return factor.to(img).reshape(-1, *([1] * (img.dim() - 1)))


def apply_color_jitter(img01: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor,
                       order: Sequence[int] = (0, 1, 2, 3)) -> Tensor:
    """img01 [B, 3, H, W] RGB in [0, 1] and per-image [B] factors -> jittered, kornia 0.5.8 `apply_color_jitter`.

    Transforms 0 brightness (x + b, clamped to [0, 1]), 1 contrast (x * c, no mean subtraction, clamped),
    2 saturation (S * s in HSV, clamped to [0, 1]), 3 hue (H + h, h in radians, torch.fmod by 2 pi; HSV -> RGB
    reads H mod 2 pi), applied in `order`.
    """
    out = img01
    for index in [int(i) for i in order]:
        if index == 0:
            out = (out + _per_image(brightness, out)).clamp(0.0, 1.0)
        elif index == 1:
            out = (out * _per_image(contrast, out)).clamp(0.0, 1.0)
        elif index == 2:
            h, s, v = rgb_to_hsv(out).unbind(dim=-3)
            s = (s * _per_image(saturation, s)).clamp(0.0, 1.0)
            out = hsv_to_rgb(torch.stack([h, s, v], dim=-3))
        elif index == 3:
            h, s, v = rgb_to_hsv(out).unbind(dim=-3)
            h = torch.fmod(h + _per_image(hue, h), 2 * math.pi)
            out = hsv_to_rgb(torch.stack([h, s, v], dim=-3))
        else:
            raise ValueError(f"apply_color_jitter: order holds {index}; transforms are 0-3")
    return out


def _uniform(generator: torch.Generator | None, n: int, low: float, high: float) -> Tensor:
    """n draws of U(low, high) as float64 on the generator's device (so the draws do not depend on the images)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)


def color_jitter(img01: Tensor, strength: float, generator: torch.Generator | None) -> Tensor:
    """img01 [B, 3, H, W] RGB in [0, 1] -> jittered in [0, 1]: kornia 0.5.8 ColorJitter(s, s, s, s), one call.

    Per image: brightness b ~ U(-s, s) added, contrast c ~ U(1 - s, 1 + s) multiplied, saturation ~ U(1 - s, 1 + s),
    hue ~ U(-s, s) * 2 pi radians (draws in that order: b, c, saturation, hue, each [B]); then one random order of
    the four transforms for the call (`torch.randperm(4, generator=generator)`), as kornia draws one per call.
    """
    if img01.dim() != 4 or img01.shape[1] != 3 or not img01.is_floating_point():
        raise ValueError(f"color_jitter expects float RGB images [B, 3, H, W], got {img01.dtype} "
                         f"{tuple(img01.shape)}")
    if not 0 <= strength <= 0.5:
        raise ValueError(f"color_jitter: strength must be in [0, 0.5] (kornia's hue bound), got {strength}")
    batch = img01.shape[0]
    brightness = _uniform(generator, batch, -strength, strength)
    contrast = _uniform(generator, batch, 1 - strength, 1 + strength)
    saturation = _uniform(generator, batch, 1 - strength, 1 + strength)
    hue = _uniform(generator, batch, -strength, strength) * 2 * math.pi
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(4, generator=generator, device=device).tolist()
    return apply_color_jitter(img01, brightness, contrast, saturation, hue, order)


def strong_augment(images: Tensor, mean: Tensor | Sequence[float], std: Tensor | Sequence[float], *,
                   generator: torch.Generator | None, jitter_strength: float = 0.2, jitter_p: float = 0.8,
                   blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.15, 1.15)) -> Tensor:
    """images [B, 3, H, W] normalised RGB -> strongly augmented images, same dtype (DAFormer `strong_transform`).

    `mean`/`std` (3 values each, per RGB channel) are the normalisation in [0, 1] pixel units: x = (p - mean) / std
    with p in [0, 1] (`plca.data.TransformConfig` scale 1; for scale 255 pass mean / 255 and std / 255).
    Draws, all from `generator` and in this order: u = U(0, 1) for colour jitter and u2 = U(0, 1) for blur, one
    each for the whole batch (the release draws them once per step). If u > 1 - jitter_p: denormalise to [0, 1],
    `color_jitter` each image on its own (the release calls kornia once per mixed image, so each image has its own
    factors and its own order of the four transforms), renormalise. If u2 > 1 - blur_p (the release: > 0.5):
    sigma ~ U(blur_sigma) per image [B], `gaussian_blur`. Jitter before blur.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"strong_augment expects float RGB images [B, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    for name, p in (("jitter_p", jitter_p), ("blur_p", blur_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"strong_augment: {name} must be in [0, 1], got {p}")
    lo, hi = blur_sigma
    if not 0 < lo <= hi:
        raise ValueError(f"strong_augment: blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}")
    u_jitter, u_blur = _uniform(generator, 2, 0.0, 1.0).tolist()
    out = images
    if u_jitter > 1 - jitter_p:
        m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
        s = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
        img01 = out * s + m
        img01 = torch.cat([color_jitter(img01[i:i + 1], jitter_strength, generator) for i in range(len(img01))])
        out = (img01 - m) / s
    if u_blur > 1 - blur_p:
        out = gaussian_blur(out, _uniform(generator, len(out), lo, hi).to(out))
    return out
