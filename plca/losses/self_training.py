"""The retraining loss of the self-training family: CBST's pseudo-label cross-entropy (Zou et al. ECCV 2018), CRST's
model regularisers MRKLD / MRENT / MRL2 and LRENT's soft labels (Zou et al. ICCV 2019), TPLD's bootstrapping
(Shin et al. ECCV 2020; no code released: the spec's reading). Project spec `self-training.md`.

With valid = pixels with a pseudo-label (int labels != ignore_index; soft labels whose sum over C != 0), over the
whole (mixed source + target) batch, and iw_b the image weights, the released code's normalisation
(crst_seg.py `reg_loss_calc`, `reg_loss_calc_expand`) is

    L = sum_valid CE / #valid + weight * sum_b iw_b sum_{valid pixels of b} R / #(valid pixels of images, iw_b != 0)

the second term dropped when that count is 0. The code passes iw = mr_weight_kld for target images and 0 for
source ones, so its effective MRKLD weight is weight * iw = 0.1^2; pass `image_weights=None` (ones) for the paper's
alpha per target pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

Regularizer = Literal["none", "kld", "ent", "l2"]
REGULARIZERS: tuple[str, ...] = ("none", "kld", "ent", "l2")


def one_hot_labels(labels: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """int labels [B, H, W] -> [B, C, H, W] one-hot in `dtype`, all zero where `ignore_index`: hard labels as soft
    ones (a soft target of `self_training_loss` leaves all-zero pixels out, as int labels leave ignore_index)."""
    valid = labels != ignore_index
    out = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), dtype=dtype, device=labels.device)
    return out.scatter_(1, torch.where(valid, labels, 0)[:, None].to(torch.int64), valid[:, None].to(dtype))


def _regulariser(log_q: Tensor, regularizer: str, kl_constant: bool) -> Tensor:
    """[B, C, H, W] log-softmax -> [B, H, W] per-pixel R of CRST's model regularisation (MRKLD, MRENT, MRL2)."""
    num_classes = log_q.shape[1]
    if regularizer == "kld":
        # MRKLD: KL(u || q) = -log C - (1/C) sum_c log q_c; the code (reg_loss_calc's `kld`) drops the constant
        # -log C; kl_constant=True keeps it (the paper's KL; same gradient).
        r = -log_q.sum(dim=1) / num_classes
        return r - math.log(num_classes) if kl_constant else r
    if regularizer == "ent":  # MRENT: sum_c q log q (negative entropy; paper only)
        return (log_q.exp() * log_q).sum(dim=1)
    if regularizer == "l2":  # MRL2: sum_c q^2 (paper only)
        return log_q.exp().square().sum(dim=1)
    raise AssertionError(regularizer)


def self_training_loss(logits: Tensor, target: Tensor, *, regularizer: Regularizer = "none", weight: float = 0.0,
                       image_weights: Tensor | Sequence[float] | None = None, bootstrap: float | None = None,
                       thresholds: Tensor | Sequence[float] | None = None, ignore_index: int = IGNORE_INDEX,
                       reg_pixels: Literal["labelled", "all"] = "labelled", kl_constant: bool = False) -> Tensor:
    """Scalar self-training loss of logits [B, C, H, W] against pseudo-labels `target`.

    target: int labels [B, H, W] (`ignore_index` = no label; CBST/CRST-MR, code `reg_loss_calc`) or soft labels
    [B, C, H, W] (LRENT, code `reg_loss_calc_expand`: -sum_c y_c log q_c; a pixel whose soft label sums to 0 is
    ignored). The main term is the mean over valid pixels (0, still backpropagating, when there are none).

    regularizer: "none", or CRST's model regularisation R (the paper's MR), per pixel, q = softmax(logits):
    "kld" MRKLD -(1/C) sum_c log q_c (the code's; `kl_constant=True` subtracts log C: the paper's KL(u || q)),
    "ent" MRENT sum_c q_c log q_c, "l2" MRL2 sum_c q_c^2; added as `weight` * sum_b iw_b sum R / #valid pixels of
    the images with iw_b != 0 (module docstring), iw = `image_weights` [B] (None: ones). R is summed over the
    valid (pseudo-labelled) pixels as the code does; `reg_pixels="all"` sums it over every pixel of those images
    (the paper's regulariser on all target pixels), normalised by their count.

    bootstrap: TPLD's beta (needs `thresholds` [C]): the main term becomes
    -sum_valid sum_c [beta t_c + (1 - beta) sg(q_c / lambda_c)] (log q_c - log lambda_c) / #valid, t the
    one-hot or soft target, sg = stop-gradient (the spec's reading; beta unconfirmed by any source).
    """
    if logits.dim() != 4:
        raise ValueError(f"self_training_loss expects logits [B, C, H, W], got {tuple(logits.shape)}")
    batch, num_classes, height, width = logits.shape
    if regularizer not in REGULARIZERS:
        raise ValueError(f"self_training_loss: unknown regularizer {regularizer!r}; expected one of {REGULARIZERS}")
    if reg_pixels not in ("labelled", "all"):
        raise ValueError(f"self_training_loss: reg_pixels must be 'labelled' or 'all', got {reg_pixels!r}")
    log_q = torch.log_softmax(logits, dim=1)

    if target.shape == (batch, height, width) and not target.is_floating_point():
        valid = target != ignore_index
        bad = target[valid & ((target < 0) | (target >= num_classes))]
        if bad.numel():
            raise ValueError(f"self_training_loss: labels {sorted(set(bad.tolist()))[:10]} outside "
                             f"[0, {num_classes}) and not ignore_index {ignore_index}")
        t = one_hot_labels(target, num_classes, ignore_index=ignore_index, dtype=log_q.dtype)
    elif target.shape == logits.shape and target.is_floating_point():
        valid = target.sum(dim=1) != 0
        t = target.to(log_q.dtype)
    else:
        raise ValueError(f"self_training_loss: target must be int labels [B, H, W] = {[batch, height, width]} or "
                         f"soft labels [B, C, H, W] = {list(logits.shape)}, got {tuple(target.shape)} "
                         f"{target.dtype}")
    mask = valid[:, None].to(log_q.dtype)
    num_valid = valid.sum().clamp(min=1).to(log_q.dtype)

    if bootstrap is None:
        main = -(t * log_q * mask).sum() / num_valid
    else:
        if thresholds is None:
            raise ValueError("self_training_loss: bootstrap (TPLD beta) needs the class thresholds")
        if not 0.0 <= bootstrap <= 1.0:
            raise ValueError(f"self_training_loss: bootstrap must be in [0, 1], got {bootstrap}")
        lam = torch.as_tensor(thresholds, dtype=log_q.dtype, device=log_q.device)
        if lam.shape != (num_classes,) or not bool((lam > 0).all()):
            raise ValueError(f"self_training_loss: thresholds must be [C] = [{num_classes}] and > 0, got "
                             f"{lam.tolist()}")
        lam = lam[None, :, None, None]
        soft_target = bootstrap * t + (1 - bootstrap) * (log_q.exp() / lam).detach()
        main = -(soft_target * (log_q - lam.log()) * mask).sum() / num_valid

    if regularizer == "none" or weight == 0:
        return main
    if image_weights is None:
        iw = log_q.new_ones(batch)
    else:
        iw = torch.as_tensor(image_weights, dtype=log_q.dtype, device=log_q.device)
        if iw.shape != (batch,):
            raise ValueError(f"self_training_loss: image_weights must be [B] = [{batch}], got {tuple(iw.shape)}")
    pixels = valid if reg_pixels == "labelled" else torch.ones_like(valid)
    pixels = pixels & (iw != 0)[:, None, None]
    num_reg = pixels.sum()
    if num_reg == 0:  # the code: term dropped when no image with iw != 0 has a valid pixel
        return main
    reg = _regulariser(log_q, regularizer, kl_constant)
    reg = torch.where(pixels, reg, torch.zeros_like(reg))  # where, not a product: no 0 * inf
    return main + weight * (iw[:, None, None] * reg).sum() / num_reg.to(log_q.dtype)
