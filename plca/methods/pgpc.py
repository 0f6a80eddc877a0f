"""PGPC (seed 002): pseudo-label guided pixel contrast on top of DAFormer (spec mean-teacher.md). The student's
four encoder stages, brought to stride 4, concatenated and resized to a `contrast_size` grid, enter a pixel
contrastive loss on the source batch (ground-truth labels, no weight) and on the mixed batch (mixed labels and
weights), beside DAFormer's terms; the pseudo-label weight is scaled by lambda_t = 0.8. The loss is the released one
(CLUDA's contrastive_loss, which PGPC imports), with its feature/label pairing (`pair_order: released`; `aligned`
pairs each feature with its own pixel's label, the evident intent). No prototypes, queue or teacher features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from plca.engine.contract import StepOutput
from plca.losses import contrast_inputs, pixel_contrast_loss
from plca.methods.daformer import DAFormer, DAFormerOptions
from plca.methods.registry import register
from plca.models.output import FEATURE_MAPS


@dataclass
class PGPCOptions(DAFormerOptions):
    """PGPC's released values: DAFormer's, lambda_t 0.8, unit contrast weights on a 65x65 grid (512 crops)."""

    pseudo_weight: float = 0.8
    w_contrast_src: float = 1.0
    w_contrast_mix: float = 1.0
    #: (h, w) of the grid the contrast compares pixels on (65x65 of a 512x512 crop).
    contrast_size: tuple[int, int] = (65, 65)
    pair_order: Literal["released", "aligned"] = "released"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.contrast_size = tuple(self.contrast_size)
        if len(self.contrast_size) != 2 or min(self.contrast_size) < 1:
            raise ValueError(f"contrast_size must be a positive (h, w), got {self.contrast_size}")


@register(PGPCOptions)
class PGPC(DAFormer):
    name: ClassVar[str] = "pgpc"
    cfg: PGPCOptions

    def _add_contrast(self, terms: StepOutput, out: dict[str, Any], labels: Tensor, weights: Tensor | None,
                      w: float, key: str) -> StepOutput:
        """`terms` plus w x the pixel contrast of the student's encoder maps `out` against `labels` (`weights`)."""
        if not w:
            return terms
        if FEATURE_MAPS not in out:
            raise ValueError(f"{self.name}: the pixel contrast needs the encoder's feature maps ('{FEATURE_MAPS}'); "
                             f"this network gives {sorted(out)}")
        feats, lab, wt = contrast_inputs(out[FEATURE_MAPS], labels.unsqueeze(1), weights, size=self.cfg.contrast_size)
        cl = pixel_contrast_loss(feats, lab, wt, pair_order=self.cfg.pair_order)
        terms.loss = terms.loss + w * cl
        terms.terms[key] = float(cl.detach())
        return terms

    def source_terms(self, out: dict[str, Any], xs: Tensor, ys: Tensor) -> StepOutput:
        terms = super().source_terms(out, xs, ys)
        return self._add_contrast(terms, out, ys, None, self.cfg.w_contrast_src, "cl_src")

    def mix_terms(self, out: dict[str, Any], labels: Tensor, weights: Tensor) -> StepOutput:
        terms = super().mix_terms(out, labels, weights)
        return self._add_contrast(terms, out, labels, weights, self.cfg.w_contrast_mix, "cl_mix")
