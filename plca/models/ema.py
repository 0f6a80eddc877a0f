"""The exponential moving average of a teacher's parameters (Mean Teacher; DACS, DAFormer, PGPC as released):
parameters only, never BatchNorm buffers; no gradient reaches the teacher. `teacher_mode_` puts the teacher in the
mode it predicts in: train mode (BatchNorm on the batch's statistics) with Dropout and DropPath off."""

from __future__ import annotations

import torch
from torch import nn

from plca.models.mit import DropPath


def ema_alpha(step: int, alpha_max: float = 0.999) -> float:
    """alpha_t = min(1 - 1 / (t + 1), alpha_max): 0 at step 0 (the teacher becomes the student), then rising."""
    return min(1.0 - 1.0 / (step + 1), alpha_max)


@torch.no_grad()
def ema_init_(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's parameters into the teacher (buffers are left as they are, as released)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.copy_(s)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, step: int, alpha_max: float = 0.999) -> float:
    """theta_T <- alpha theta_T + (1 - alpha) theta_S with alpha = `ema_alpha(step, alpha_max)`, parameters only;
    returns the alpha used."""
    alpha = ema_alpha(step, alpha_max)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    return alpha


def teacher_mode_(model: nn.Module) -> nn.Module:
    """`model.train()`, then every Dropout (any `_DropoutNd`) and DropPath module in eval mode; returns `model`.

    The mean teacher of DAFormer/PGPC as released predicts in train mode, so its BatchNorm layers use the target
    batch's statistics, but without the stochastic layers, so its pseudo-labels are not randomly perturbed.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd | DropPath):
            m.eval()
    return model
