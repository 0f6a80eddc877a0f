"""MinEnt (ADVENT, Vu et al., CVPR 2019): source supervision + the mean normalised entropy of the target
predictions at the crop size, a standard adaptation baseline beside PLCA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from plca.data.labels import IGNORE_INDEX
from plca.engine.contract import Method, StepOutput
from plca.losses import entropy_loss
from plca.methods.base import source_supervision
from plca.methods.registry import register
from plca.models.output import LOGITS


@dataclass
class MinEntConfig:
    #: Weight of the target entropy (ADVENT: lambda_ent = 0.001).
    w_ent: float = 0.001
    lovasz: bool = True
    w_lov: float = 0.75
    ignore_index: int = IGNORE_INDEX


@register(MinEntConfig)
class MinEnt(Method):
    name: ClassVar[str] = "minent"
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: MinEntConfig

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        ls = self.model(batch["source_image"])[LOGITS]
        out = source_supervision(self.model, ls, batch["source_label"], lovasz=cfg.lovasz, w_lov=cfg.w_lov,
                                 ignore_index=cfg.ignore_index)
        xt = batch["target_image"]
        lt = self.model(xt)[LOGITS]
        # ADVENT scores the entropy of the target prediction upsampled to the input size
        ent = entropy_loss(self.model.upsample(lt, tuple(xt.shape[-2:])).float())
        out.loss = out.loss + cfg.w_ent * ent
        out.terms["entropy_t"] = float(ent.detach())
        return out
