"""Source-only training: cross-entropy (+ Lovasz-softmax) on labelled images. Also the oracle, fed target labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from plca.data.labels import IGNORE_INDEX
from plca.engine.contract import Method, StepOutput
from plca.methods.base import source_supervision
from plca.methods.registry import register
from plca.models.output import LOGITS


@dataclass
class SourceOnlyConfig:
    #: Add the Lovasz-softmax term (Table 1: "+ Lovasz"; Table 2's "Source Only" 34.3 is CE + Lovasz).
    lovasz: bool = True
    w_lov: float = 0.75
    ignore_index: int = IGNORE_INDEX


@register(SourceOnlyConfig)
class SourceOnly(Method):
    name: ClassVar[str] = "source_only"
    streams: ClassVar[tuple[str, ...]] = ("source",)
    cfg: SourceOnlyConfig

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.model(batch["source_image"])[LOGITS]
        cfg = self.cfg
        return source_supervision(self.model, logits, batch["source_label"], lovasz=cfg.lovasz, w_lov=cfg.w_lov,
                                  ignore_index=cfg.ignore_index, reducer=self.reducer)
