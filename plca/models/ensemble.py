"""An ensemble of trained segmenters scored as one model: the weighted sum of their logits (ADVENT's released
AdvEnt+MinEnt: 0.5 / 0.5 of the two models' upsampled main logits, then argmax).

Summing the logits at the feature grid and upsampling the sum equals upsampling each and summing (bilinear
interpolation is linear), provided the members interpolate alike, which the constructor checks. An ensemble has
no single feature map: it returns logits only, so neither test-time aggregation nor the cycle diagnostics apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from plca.models.output import LOGITS, SegmentationModel


class Ensemble(SegmentationModel):
    def __init__(self, members: Sequence[SegmentationModel], weights: Sequence[float]) -> None:
        super().__init__()
        if len(members) != len(weights) or len(members) < 2:
            raise ValueError(f"an ensemble needs two or more members, one weight each; got {len(members)} "
                             f"members and {len(weights)} weights")
        corners = {m.align_corners for m in members}
        strides = {getattr(m, "output_stride", None) for m in members}
        if len(corners) != 1 or len(strides) != 1:
            raise ValueError("ensemble members must upsample alike (same align_corners and output stride)")
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]
        self.align_corners = corners.pop()
        self.output_stride = strides.pop()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = None
        for w, member in zip(self.weights, self.members, strict=True):
            part = w * member(x)[LOGITS]
            logits = part if logits is None else logits + part
        return {LOGITS: logits}
