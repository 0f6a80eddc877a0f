"""MinEnt (ADVENT, Vu et al., CVPR 2019, Sec. 3.1): source supervision + lambda_ent x the mean normalised entropy
(Eq. 2-3) of the target predictions upsampled to the input size, at both levels as the released code (main 0.001,
aux 0.0002; source CE main + 0.1 aux; no Lovasz), a standard adaptation baseline beside PLCA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from plca.data.labels import IGNORE_INDEX
from plca.engine.contract import Method, StepOutput
from plca.losses import entropy_loss
from plca.methods.base import require_aux, segmentation_supervision
from plca.methods.registry import register
from plca.models.output import AUX_LOGITS, LOGITS


@dataclass
class MinEntConfig:
    #: lambda_ent of the main level (ADVENT: 0.001).
    w_ent: float = 0.001
    #: lambda_ent of the aux level (ADVENT: 0.0002); unused single-level.
    w_ent_aux: float = 0.0002
    #: Two levels (aux head on layer3) as the released code; off: the main level alone.
    multi_level: bool = True
    #: Weight of the aux level's source CE (0.1); unused single-level.
    w_seg_aux: float = 0.1
    #: Lovasz on the main source level (not in the released code).
    lovasz: bool = False
    w_lov: float = 0.75
    ignore_index: int = IGNORE_INDEX


@register(MinEntConfig)
class MinEnt(Method):
    name: ClassVar[str] = "minent"
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: MinEntConfig

    @classmethod
    def model_options(cls, cfg: Any) -> dict[str, Any]:
        return {"aux_head": True} if cfg.multi_level else {}

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        out_s = self.model(batch["source_image"])
        levels = {"entropy_t": (LOGITS, cfg.w_ent)}
        if cfg.multi_level:
            require_aux(out_s, self.name)
            levels["entropy_t_aux"] = (AUX_LOGITS, cfg.w_ent_aux)
        out = segmentation_supervision(self.model, out_s, batch["source_label"], lovasz=cfg.lovasz, w_lov=cfg.w_lov,
                                       w_seg_aux=cfg.w_seg_aux if cfg.multi_level else 0.0,
                                       ignore_index=cfg.ignore_index)
        xt = batch["target_image"]
        out_t = self.model(xt)
        for term, (key, weight) in levels.items():
            # ADVENT scores the entropy of the target prediction upsampled to the input size
            ent = entropy_loss(self.model.upsample(out_t[key], tuple(xt.shape[-2:])).float())
            out.loss = out.loss + weight * ent
            out.terms[term] = float(ent.detach())
        return out
