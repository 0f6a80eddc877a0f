"""Mean-teacher self-training losses as released by DACS (Tranheden et al., WACV 2021) and DAFormer (Hoyer et al.,
CVPR 2022), reused by PGPC.

* `pseudo_label_weight`: the teacher's pseudo-label and its confidence weight, one scalar q per batch (DACS Sec. 3.2,
  DAFormer's `DACS.forward_train`), with DAFormer's border rows zeroed and PGPC's lambda_t as `scale`.
* `weighted_pixel_ce`: the CE of the source and mixed batches, mean over *all* pixels (mmseg's `cross_entropy` with
  `reduction='mean'`, no `avg_factor`): ignored pixels add 0 but count in the divisor.
* `downscale_label_ratio`, `feature_distance`: DAFormer's ImageNet feature distance (paper Eq. 7-8; released
  `downscale_label_ratio`, `masked_feat_dist`, `calc_feat_dist`), without its lambda_FD = 0.005.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX, NUM_CLASSES

#: Cityscapes train ids of DAFormer's FD "thing" classes (its config's `imnet_feature_dist_classes`): traffic light,
#: traffic sign, person, rider, car, truck, bus, train, motorcycle, bicycle.
THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def _squeeze_channel(x: Tensor, name: str, caller: str) -> Tensor:
    """[B, 1, H, W] -> [B, H, W]; [B, H, W] passes; anything else is a ValueError naming `caller`."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ValueError(f"{caller} expects {name} [B, H, W] or [B, 1, H, W], got shape {tuple(x.shape)}")


@torch.no_grad()
def pseudo_label_weight(
    teacher_logits: Tensor,
    threshold: float = 0.968,
    *,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Teacher logits [B, C, H, W] (already upsampled to the crop) -> (pseudo-label int64 [B, H, W], weight float32
    [B, H, W]).

    DACS / DAFormer: p = max softmax, y = argmax; q = #(p >= threshold) / (B*H*W), one scalar for the whole batch;
    the weight is q * scale at every pixel (scale = PGPC's lambda_t = 0.8; 1 in DACS and DAFormer), then DAFormer's
    `psweight_ignore_top` rows [0, ignore_top) and the last `ignore_bottom` rows are set to 0 (15 and 120 of a
    512 crop in DAFormer and PGPC; 0 in DACS). The softmax runs in float64 for float64 logits, else float32; the
    weight is float32 as released (`torch.ones`). No gradient.
    """
    if teacher_logits.dim() != 4:
        raise ValueError(f"pseudo_label_weight expects teacher_logits [B, C, H, W], got {tuple(teacher_logits.shape)}")
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"pseudo_label_weight: ignore_top / ignore_bottom must be >= 0, got {ignore_top}, "
                         f"{ignore_bottom}")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    prob = torch.softmax(teacher_logits.detach().to(dtype), dim=1)
    p, labels = prob.max(dim=1)
    q = (p >= threshold).sum().item() / p.numel()
    weight = torch.full(p.shape, q * scale, dtype=torch.float32, device=p.device)
    if ignore_top > 0:
        weight[:, :ignore_top, :] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:, :] = 0
    return labels.long(), weight


def weighted_pixel_ce(
    logits: Tensor, labels: Tensor, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """DAFormer's segmentation loss (mmseg `cross_entropy`, reduction 'mean', no avg_factor): per-pixel CE
    (ignore_index pixels give 0), times `weight` [B, H, W] if given, mean over all B*H*W pixels -- ignored pixels
    count in the divisor, unlike `plca.losses.cross_entropy`.

    logits [B, C, H, W]; labels and weight [B, H, W] or [B, 1, H, W]. The result has the logits' dtype.
    """
    labels = _squeeze_channel(labels, "labels", "weighted_pixel_ce")
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"weighted_pixel_ce expects logits [B, C, H, W] and labels [B, H, W], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    labels = labels.long()
    keep = labels != ignore_index
    bad = labels[keep & ((labels < 0) | (labels >= logits.shape[1]))]
    if bad.numel():
        raise ValueError(f"weighted_pixel_ce: labels {sorted(set(bad.tolist()))[:10]} outside "
                         f"[0, {logits.shape[1]}) and not ignore_index {ignore_index}")
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        weight = _squeeze_channel(weight, "weight", "weighted_pixel_ce")
        if weight.shape != labels.shape:
            raise ValueError(f"weighted_pixel_ce: weight {tuple(weight.shape)} does not match labels "
                             f"{tuple(labels.shape)}")
        loss = loss * weight.to(loss.dtype)
    return loss.mean()


def downscale_label_ratio(
    labels: Tensor, scale_factor: int, min_ratio: float, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """DAFormer's `downscale_label_ratio`: labels [B, 1, H, W] (or [B, H, W]) -> [B, 1, H/s, W/s] int64.

    ignore_index becomes an extra class `num_classes`; the one-hot map (num_classes + 1 channels) is averaged over
    s x s cells (avg_pool2d, kernel = stride = s); a cell takes its majority class, or ignore_index when that class's
    fraction is below `min_ratio` or the majority is the ignore class. H and W must be multiples of s (the released
    code silently floors; here it is a ValueError).
    """
    labels = _squeeze_channel(labels, "labels", "downscale_label_ratio")
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"downscale_label_ratio: scale_factor must be a positive integer, got {scale_factor}")
    scale_factor = int(scale_factor)
    height, width = labels.shape[-2:]
    if height % scale_factor or width % scale_factor:
        raise ValueError(f"downscale_label_ratio: label size {height}x{width} is not divisible by scale_factor "
                         f"{scale_factor}")
    out = labels.long().clone()
    ignored = out == ignore_index
    bad = out[~ignored & ((out < 0) | (out >= num_classes))]
    if bad.numel():
        raise ValueError(f"downscale_label_ratio: labels {sorted(set(bad.tolist()))[:10]} outside "
                         f"[0, {num_classes}) and not ignore_index {ignore_index}")
    out[ignored] = num_classes
    one_hot = F.one_hot(out, num_classes=num_classes + 1).permute(0, 3, 1, 2).float()
    ratio = F.avg_pool2d(one_hot, kernel_size=scale_factor, stride=scale_factor)
    gt_ratio, out = ratio.max(dim=1, keepdim=True)
    out[out == num_classes] = ignore_index
    out[gt_ratio < min_ratio] = ignore_index
    return out


def feature_distance(
    feat: Tensor,
    feat_imnet: Tensor,
    labels: Tensor,
    *,
    classes: Sequence[int] = THING_CLASSES,
    scale_min_ratio: float = 0.75,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """DAFormer's thing-class ImageNet feature distance (paper Eq. 7-8; released `calc_feat_dist` with
    `masked_feat_dist`), without lambda_FD: the mean over the kept stage-4 cells of ||feat - feat_imnet||_2 over
    channels.

    feat, feat_imnet [B, C, h, w] (student and frozen ImageNet encoder, stage 4); labels [B, 1, H, W] or [B, H, W]
    at full size. scale_factor = W // w as released; `downscale_label_ratio(labels, scale_factor, scale_min_ratio,
    num_classes)` labels the cells, and cells whose label is in `classes` are kept. feat_imnet is detached. An empty
    selection (NaN in the release, with zero gradient) gives a zero that backpropagates zeros into feat.
    """
    if feat.dim() != 4 or feat_imnet.shape != feat.shape:
        raise ValueError(f"feature_distance expects feat and feat_imnet of one shape [B, C, h, w], got "
                         f"{tuple(feat.shape)} and {tuple(feat_imnet.shape)}")
    labels = _squeeze_channel(labels, "labels", "feature_distance")
    scale_factor = labels.shape[-1] // feat.shape[-1]
    cells = downscale_label_ratio(labels, scale_factor, scale_min_ratio, num_classes, ignore_index)[:, 0]
    if cells.shape != (feat.shape[0], *feat.shape[2:]):
        raise ValueError(f"feature_distance: labels {tuple(labels.shape)} downscaled by {scale_factor} give "
                         f"{tuple(cells.shape)}, not the features' [B, h, w] = "
                         f"{(feat.shape[0], *feat.shape[2:])}")
    wanted = torch.tensor(list(classes), dtype=torch.long, device=cells.device)
    mask = (cells[..., None] == wanted).any(-1)
    if not bool(mask.any()):
        return (feat * 0).sum()
    dist = torch.linalg.vector_norm(feat - feat_imnet.detach(), ord=2, dim=1)
    return dist[mask].mean()
