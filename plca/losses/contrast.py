"""PGPC's pixel contrast on encoder features, with CLUDA's supervised contrastive loss standing in for PGPC's
unpublished `contrastive_loss.py` (PGPC imports it under CLUDA's name and signature).

* `contrast_inputs`: PGPC's inputs -- the student's four encoder stages, each bilinear (align_corners False) to the
  stride-4 size, concatenated, then bilinear (align_corners True) to a 65 x 65 grid; labels nearest, pixel weights
  bilinear (align_corners True).
* `pixel_contrast_loss`: CLUDA's supervised contrastive loss (SupCon form, Khosla et al. 2020) over every grid pixel
  of the batch, with the released row order (`pair_order="released"`) or the evident intent (`"aligned"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PAIR_ORDERS = ("released", "aligned")


def _as_b1hw(x: Tensor, name: str, caller: str) -> Tensor:
    """[B, H, W] -> [B, 1, H, W]; [B, 1, H, W] passes; anything else is a ValueError naming `caller`."""
    if x.dim() == 3:
        return x[:, None]
    if x.dim() == 4 and x.shape[1] == 1:
        return x
    raise ValueError(f"{caller} expects {name} [B, 1, H, W] or [B, H, W], got shape {tuple(x.shape)}")


def contrast_inputs(
    stage_feats: Sequence[Tensor],
    labels: Tensor,
    weight: Tensor | None = None,
    size: tuple[int, int] = (65, 65),
) -> tuple[Tensor, Tensor, Tensor | None]:
    """PGPC's contrast inputs: (features [B, sum C_i, h, w], labels int64 [B, 1, h, w], weight [B, 1, h, w] | None)
    with (h, w) = `size`.

    Each stage map (NCHW) is resized bilinearly (align_corners False) to the first map's (stride-4) size and the maps
    are concatenated on channels, then resized bilinearly with align_corners True to `size`. Labels [B, 1, H, W] (or
    [B, H, W]) are resampled with F.interpolate's 'nearest' (on float, back to int64); the pixel weight [B, H, W] (or
    [B, 1, H, W]) bilinearly with align_corners True.
    """
    if not stage_feats:
        raise ValueError("contrast_inputs needs at least one stage feature map")
    if any(f.dim() != 4 for f in stage_feats):
        raise ValueError(f"contrast_inputs expects NCHW stage maps, got shapes {[tuple(f.shape) for f in stage_feats]}")
    base = tuple(stage_feats[0].shape[-2:])
    ups = [f if tuple(f.shape[-2:]) == base else F.interpolate(f, size=base, mode="bilinear", align_corners=False)
           for f in stage_feats]
    feats = F.interpolate(torch.cat(ups, dim=1), size=tuple(size), mode="bilinear", align_corners=True)
    labels = _as_b1hw(labels, "labels", "contrast_inputs")
    labels = F.interpolate(labels.float(), size=tuple(size), mode="nearest").long()
    if weight is not None:
        weight = _as_b1hw(weight, "weight", "contrast_inputs")
        weight = F.interpolate(weight, size=tuple(size), mode="bilinear", align_corners=True)
    return feats, labels, weight


def pixel_contrast_loss(
    feats: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    *,
    thing_classes: Sequence[int] | None = None,
    pair_order: str = "released",
) -> Tensor:
    """CLUDA's supervised pixel contrast as PGPC runs it (no temperature: tau / tau_base = 1).

    z = features L2-normalised over channels, one row per pixel of the batch (N = B*h*w rows); s_rk = z_r . z_k;
    Pos(r) = {k != r : y_k = y_r}, Neg(r) = {k : y_k != y_r};
    l_rk = s_rk - log(exp(s_rk) + sum_{n in Neg(r)} exp(s_rn)), times w_r * w_k when `weight` is given;
    L = -(1/N) sum_r sum_{k in Pos(r)} l_rk / max(|Pos(r)|, 1). Rows without positives add 0 (and still count in
    N); 255 is an ordinary class.

    Row order: labels and weights are always image-major (row r = pixel r mod hw of image floor(r / hw)). With
    `pair_order="released"` the feature rows are pixel-major (row r = pixel floor(r / B) of image r mod B), as the
    released code flattens them, so for B > 1 a row's feature and its label/weight come from different pixels;
    `"aligned"` flattens the features image-major too (the evident intent). For B = 1 both orders agree.

    `thing_classes` is accepted for the released signature and ignored: the released thing/stuff pair mask has no
    effect on the loss. feats [B, C, h, w]; labels and weight [B, 1, h, w] or [B, h, w]. Computed in float64 for
    float64 features, else float32; memory O(N^2).
    """
    del thing_classes  # the released thing-status pair mask is a no-op
    if pair_order not in PAIR_ORDERS:
        raise ValueError(f"pixel_contrast_loss: pair_order must be one of {PAIR_ORDERS}, got {pair_order!r}")
    if feats.dim() != 4:
        raise ValueError(f"pixel_contrast_loss expects feats [B, C, h, w], got shape {tuple(feats.shape)}")
    batch, channels, height, width = feats.shape
    labels = _as_b1hw(labels, "labels", "pixel_contrast_loss")
    if labels.shape != (batch, 1, height, width):
        raise ValueError(f"pixel_contrast_loss: labels {tuple(labels.shape)} do not match feats {tuple(feats.shape)}")
    dtype = torch.promote_types(feats.dtype, torch.float32)
    z = F.normalize(feats.to(dtype), p=2, dim=1)
    if pair_order == "released":
        z = z.permute(2, 3, 0, 1).reshape(-1, channels)  # row r: pixel r // B of image r % B
    else:
        z = z.permute(0, 2, 3, 1).reshape(-1, channels)  # row r: pixel r % hw of image r // hw
    y = labels.reshape(-1)
    n = y.numel()

    sim = z @ z.T  # in [-1, 1]: exp needs no max subtraction
    same = y[:, None] == y[None, :]
    pos = same.clone()
    pos.fill_diagonal_(False)
    exp_sim = sim.exp()
    neg_sum = exp_sim.masked_fill(same, 0).sum(dim=1, keepdim=True)
    log_prob = sim - torch.log(exp_sim + neg_sum)
    if weight is not None:
        weight = _as_b1hw(weight, "weight", "pixel_contrast_loss")
        if weight.shape != labels.shape:
            raise ValueError(f"pixel_contrast_loss: weight {tuple(weight.shape)} does not match labels "
                             f"{tuple(labels.shape)}")
        w = weight.reshape(-1).to(dtype)
        log_prob = log_prob * (w[:, None] * w[None, :])
    per_row = log_prob.masked_fill(~pos, 0).sum(dim=1) / pos.sum(dim=1).clamp(min=1).to(dtype)
    return -per_row.sum() / n
