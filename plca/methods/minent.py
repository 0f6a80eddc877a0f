"""MinEnt (ADVENT, Vu et al., CVPR 2019): source supervision + the mean normalised entropy of the target
predictions at the crop size, a standard adaptation baseline beside PLCA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from plca.losses import entropy_loss
from plca.methods.base import Method, StepOutput, source_supervision, upsample


@dataclass
class MinEntConfig:
    #: Weight of the target entropy (ADVENT: lambda_ent = 0.001).
    w_ent: float = 0.001
    lovasz: bool = True
    w_lov: float = 0.75
    ignore_index: int = 255


class MinEnt(Method):
    name: ClassVar[str] = "minent"
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: MinEntConfig

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        _, ls = self.model(batch["source_image"])
        out = source_supervision(ls, batch["source_label"], lovasz=cfg.lovasz, w_lov=cfg.w_lov,
                                 ignore_index=cfg.ignore_index)
        xt = batch["target_image"]
        _, lt = self.model(xt)
        # ADVENT scores the entropy of the target prediction upsampled to the input size
        ent = entropy_loss(upsample(lt, tuple(xt.shape[-2:])).float())
        out.loss = out.loss + cfg.w_ent * ent
        out.terms["entropy_t"] = float(ent.detach())
        return out
