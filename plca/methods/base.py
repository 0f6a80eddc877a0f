"""What several methods share: source supervision (Eq. 14's first two terms). The method contract itself
(`Method`, `StepOutput`, `TrainContext`) is the engine's: `plca.engine.contract`."""

from __future__ import annotations

import torch

from plca.engine.contract import StepOutput
from plca.losses import cross_entropy, lovasz_softmax
from plca.models.output import SegmentationModel


def source_supervision(model: SegmentationModel, logits: torch.Tensor, labels: torch.Tensor, *, lovasz: bool,
                       w_lov: float, ignore_index: int) -> StepOutput:
    """CE (+ w_lov x Lovasz-softmax) of `model`'s logits upsampled to the label size by the model's own
    interpolation. Shared by every method that trains on source labels."""
    up = model.upsample(logits, tuple(labels.shape[-2:]))
    ce = cross_entropy(up, labels, ignore_index=ignore_index)
    out = StepOutput(loss=ce, terms={"ce": float(ce.detach())})
    if lovasz:
        lov = lovasz_softmax(up.float().softmax(1), labels, ignore_index=ignore_index)
        out.loss = out.loss + w_lov * lov
        out.terms["lovasz"] = float(lov.detach())
    return out
