"""Source-only training: cross-entropy (+ Lovasz-softmax) on labelled images. Also the oracle, fed target labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plca.losses import cross_entropy, lovasz_softmax
from plca.methods.base import Method, StepOutput, upsample


@dataclass
class SourceOnlyConfig:
    #: Add the Lovasz-softmax term (Table 1: "+ Lovasz"; Table 2's "Source Only" 34.3 is CE + Lovasz).
    lovasz: bool = True
    w_lov: float = 0.75
    ignore_index: int = 255


class SourceOnly(Method):
    name: ClassVar[str] = "source_only"
    streams: ClassVar[tuple[str, ...]] = ("source",)

    def __init__(self, model: nn.Module, cfg: SourceOnlyConfig) -> None:
        super().__init__(model)
        self.cfg = cfg

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        image, label = batch["source_image"], batch["source_label"]
        _, logits = self.model(image)
        logits = upsample(logits, tuple(label.shape[-2:]))
        ce = cross_entropy(logits, label, ignore_index=self.cfg.ignore_index)
        loss, terms = ce, {"ce": float(ce.detach())}
        if self.cfg.lovasz:
            lov = lovasz_softmax(logits.float().softmax(1), label, ignore_index=self.cfg.ignore_index)
            loss = loss + self.cfg.w_lov * lov
            terms["lovasz"] = float(lov.detach())
        return StepOutput(loss=loss, terms=terms)
