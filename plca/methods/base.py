"""What a method is to the training engine: its networks, its optimisers and one training step.

The engine never asks which method it runs. A method never opens a file and never knows the dataset: it
receives batches keyed by stream ("source": labelled images; "target": unlabelled images) and returns the
objective to minimise plus named scalars to log. Methods with extra networks (an AdaptSegNet/ADVENT
discriminator) list them in `networks()` and `configure_optimizers()`; their step returns the sum of the losses
of all networks, each term built so that it only reaches its own network's parameters. Multi-round methods
(CBST/CRST pseudo-labels) use `before_step` with the `TrainContext` to predict on a stream between rounds, and
keep what they need to resume in `state_dict()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from plca.engine.optim import OptimConfig, make_optimizer
from plca.losses import cross_entropy, lovasz_softmax


@dataclass
class StepOutput:
    """The objective of one micro-batch and the named scalars to log (already detached floats)."""

    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What the engine offers a method between steps."""

    device: torch.device
    step: int
    total_steps: int
    predict: Callable[[str], Any] | None = None


class Method:
    """Base class: a segmentation network trained by one optimiser. Subclasses override `training_step`."""

    name: ClassVar[str] = "method"
    #: The streams the engine must feed: "source" (images with labels), "target" (images only).
    streams: ClassVar[tuple[str, ...]] = ("source",)

    def __init__(self, model: nn.Module, cfg: Any = None) -> None:
        self.model = model
        #: The method's options, validated against its config dataclass (`build_method`).
        self.cfg = cfg

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def configure_optimizers(self, cfg: OptimConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": make_optimizer(self.model, cfg)}

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def before_step(self, ctx: TrainContext) -> None:
        """Hook for round-based methods; most methods need nothing here."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of logits to the crop or label size (align_corners=False, as torch defaults)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def source_supervision(logits: torch.Tensor, labels: torch.Tensor, *, lovasz: bool, w_lov: float,
                       ignore_index: int) -> StepOutput:
    """Eq. 14's first two terms on labelled images: CE (+ w_lov x Lovasz-softmax) of the logits upsampled to the
    label size. Shared by every method that trains on source labels."""
    up = upsample(logits, tuple(labels.shape[-2:]))
    ce = cross_entropy(up, labels, ignore_index=ignore_index)
    out = StepOutput(loss=ce, terms={"ce": float(ce.detach())})
    if lovasz:
        lov = lovasz_softmax(up.float().softmax(1), labels, ignore_index=ignore_index)
        out.loss = out.loss + w_lov * lov
        out.terms["lovasz"] = float(lov.detach())
    return out
