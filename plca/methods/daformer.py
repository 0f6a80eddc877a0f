"""DAFormer (Hoyer et al., CVPR 2022): DACS's mean-teacher self-training with three additions for a transformer
(spec mean-teacher.md): rare class sampling of the source images (`rcs`, a sampler of the source stream fed by
the class statistics the pipeline computes once), an ImageNet feature distance on thing classes (`w_fd`), and its
network and optimiser (MiT encoder + DAFormer head, AdamW with a warmup and the head at 10x: params `networks`).
Its ClassMix draws classes from the whole source batch and the pseudo-label weight ignores the crop's top and
bottom rows (GTA's border). The teacher is updated before each step's forward (alpha 0.999).

FD: the student's stage-4 features of the source batch against those of a frozen copy of the encoder it started
from (eval mode, no gradient). The released code starts from ImageNet weights, so the copy is the ImageNet encoder;
a run that starts from a source-only model (the embedded pair, where no ImageNet weights exist) freezes that
model's encoder instead, which the report says beside the row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from plca.data.rcs import RCSConfig
from plca.engine.contract import StepOutput, TrainContext
from plca.losses import THING_CLASSES, feature_distance
from plca.methods.dacs import DACS, DACSConfig
from plca.methods.registry import register
from plca.models.output import FEATURE_MAPS, SegmentationModel


@dataclass
class DAFormerOptions(DACSConfig):
    """DAFormer's released values; the fields of `DACSConfig` with DAFormer's defaults, plus RCS and FD."""

    alpha: float = 0.999
    ema_before_step: bool = True
    ignore_top: int = 15
    ignore_bottom: int = 120
    batch_union: bool = True
    jitter: float = 0.2
    #: Rare class sampling of the source images (null: uniform, as DACS).
    rcs: RCSConfig | None = field(default_factory=RCSConfig)
    #: lambda_FD; 0 turns the feature distance off.
    w_fd: float = 0.005
    #: The classes whose cells FD compares (Cityscapes' things) and the share of a 32x32 cell one class must hold.
    fd_classes: tuple[int, ...] = THING_CLASSES
    fd_min_ratio: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fd_classes = tuple(self.fd_classes)
        if self.w_fd < 0 or not 0.0 <= self.fd_min_ratio <= 1.0:
            raise ValueError(f"w_fd must be >= 0 and fd_min_ratio in [0, 1], got {self.w_fd}, {self.fd_min_ratio}")


@register(DAFormerOptions)
class DAFormer(DACS):
    name: ClassVar[str] = "daformer"
    cfg: DAFormerOptions

    def __init__(self, model: SegmentationModel, cfg: DAFormerOptions) -> None:
        super().__init__(model, cfg)
        self.imnet = None
        if cfg.w_fd > 0:
            backbone = getattr(model, "backbone", None)
            if backbone is None:
                raise ValueError(f"{self.name}: the feature distance (w_fd {cfg.w_fd}) needs a network with an "
                                 "encoder (`backbone`) and its feature maps; set w_fd 0 for this network")
            # frozen, eval mode, no gradient; not one of the trained networks (rebuilt the same way on resume)
            self.imnet = copy.deepcopy(backbone).eval()
            for p in self.imnet.parameters():
                p.requires_grad_(False)

    @classmethod
    def rare_class_sampling(cls, cfg: DAFormerOptions) -> RCSConfig | None:
        return cfg.rcs

    def before_step(self, ctx: TrainContext) -> None:
        super().before_step(ctx)
        if self.imnet is not None:
            self.imnet.to(ctx.device)

    def source_terms(self, out: dict[str, Any], xs: Tensor, ys: Tensor) -> StepOutput:
        terms = super().source_terms(out, xs, ys)
        c = self.cfg
        if self.imnet is None:
            return terms
        if FEATURE_MAPS not in out:
            raise ValueError(f"{self.name}: the feature distance needs the network's feature maps "
                             f"('{FEATURE_MAPS}'); this network gives {sorted(out)}")
        with torch.no_grad():
            reference = self.imnet(xs)[-1]
        fd = feature_distance(out[FEATURE_MAPS][-1], reference, ys, classes=c.fd_classes,
                              scale_min_ratio=c.fd_min_ratio, num_classes=self.model.cfg.num_classes,
                              ignore_index=c.ignore_index)
        terms.loss = terms.loss + c.w_fd * fd
        terms.terms["fd"] = float(fd.detach())
        return terms
