"""DACS (Tranheden et al., WACV 2021): a mean teacher pseudo-labels the target images, ClassMix pastes half the
classes of a source image onto a target image, and the student learns from the mixed image and its mixed label,
weighted by the teacher's confidence (spec mean-teacher.md). DAFormer and PGPC build on this module's step.

One step (DAFormer's order; one optimiser step, the terms summed into one objective as their separate backward
passes add up): the student's cross-entropy on the source batch; the teacher (train mode, dropout and drop-path
off, no gradient) labels the target batch: argmax labels and one weight per batch, the share of pixels at least
`threshold` confident; each image i pastes the pixels of its chosen source classes onto target image i (image,
label, weight 1 on the pasted pixels); the mixed images get the strong augmentation (colour jitter, blur); the
student's weighted cross-entropy on them. The teacher follows the student by EMA (`teachers`, the engine's EMA
hook); the model evaluated and saved is the student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from plca.data.labels import IGNORE_INDEX
from plca.data.transforms import TransformConfig
from plca.engine.contract import EMASpec, Method, StepOutput, TrainContext
from plca.losses import pseudo_label_weight, weighted_pixel_ce
from plca.methods.registry import register
from plca.models import teacher_mode_
from plca.models.output import LOGITS, SegmentationModel
from plca.pseudo import class_mix, class_mix_mask, sample_mix_classes, strong_augment


@dataclass
class DACSConfig:
    """DACS's released values (the DAFormer/PGPC modules change the defaults they change)."""

    #: EMA teacher: alpha_t = min(1 - 1/(t+1), alpha) (DACS 0.99; DAFormer and PGPC 0.999).
    alpha: float = 0.99
    #: DACS updates the teacher after the optimiser step with its 0-based step (its first update makes it the
    #: student); DAFormer before the step's forward (alpha 0 at step 0 copies the student).
    ema_before_step: bool = False
    #: A pixel is confident when the teacher's max probability is at least this; the pseudo-label weight of a
    #: batch is the share of its confident pixels.
    threshold: float = 0.968
    #: Rows of the pseudo-label weight set to 0 at the top and bottom of the crop (DAFormer, PGPC: 15 and 120 of
    #: a 512-pixel crop, GTA's ego car and sky border; DACS keeps them).
    ignore_top: int = 0
    ignore_bottom: int = 0
    #: lambda_t: the pseudo-label weight's factor (PGPC 0.8).
    pseudo_weight: float = 1.0
    #: ClassMix candidates: the classes of the whole source batch (DAFormer, PGPC) or of each image (DACS).
    batch_union: bool = False
    #: Strong augmentation of the mixed images: colour jitter strength (DACS 0.25, DAFormer 0.2) and probability,
    #: Gaussian blur probability (each decided once per step for the batch).
    jitter: float = 0.25
    jitter_p: float = 0.8
    blur_p: float = 0.5
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.ignore_top < 0 or self.ignore_bottom < 0:
            raise ValueError(f"ignore_top and ignore_bottom must be >= 0, got {self.ignore_top}, {self.ignore_bottom}")
        for key in ("jitter_p", "blur_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be a probability, got {getattr(self, key)}")
        if self.jitter < 0 or self.pseudo_weight < 0:
            raise ValueError(f"jitter and pseudo_weight must be >= 0, got {self.jitter}, {self.pseudo_weight}")


@register(DACSConfig)
class DACS(Method):
    name: ClassVar[str] = "dacs"
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: DACSConfig

    def __init__(self, model: SegmentationModel, cfg: DACSConfig) -> None:
        super().__init__(model, cfg)
        # a copy of the starting model: DACS's teacher starts as the student (DAFormer's first update copies it)
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._mean = self._std = None
        self._bgr = False
        self._generator = torch.Generator()

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    def teachers(self) -> dict[str, EMASpec]:
        return {"teacher": EMASpec("model", self.cfg.alpha, self.cfg.ema_before_step)}

    def set_normalization(self, transform: TransformConfig) -> None:
        # colour jitter works on RGB pixels in [0, 1]: the normalisation's mean and std in those units
        self._mean = torch.tensor(transform.mean, dtype=torch.float32).view(1, 3, 1, 1) / transform.scale
        self._std = torch.tensor(transform.std, dtype=torch.float32).view(1, 3, 1, 1) / transform.scale
        self._bgr = transform.channel_order == "bgr"

    def before_step(self, ctx: TrainContext) -> None:
        # this step's mixing and augmentation draws come from torch's RNG, which checkpoints resume: a resumed
        # run mixes as the uninterrupted one
        self._generator.manual_seed(int(torch.randint(0, 2**62, (1,))))

    def _augment(self, images: Tensor) -> Tensor:
        """Strong augmentation of normalised images: back to RGB in [0, 1], jitter and blur, normalised again."""
        if self._mean is None:
            raise RuntimeError(f"{self.name}: set_normalization was not called before training")
        mean, std = self._mean.to(images), self._std.to(images)
        x = images * std + mean
        if self._bgr:
            x = x.flip(1)
        c = self.cfg
        x = strong_augment(x, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), generator=self._generator,
                           jitter_strength=c.jitter, jitter_p=c.jitter_p, blur_p=c.blur_p)
        if self._bgr:
            x = x.flip(1)
        return (x - mean) / std

    def _pseudo_labels(self, target: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        c = self.cfg
        teacher_mode_(self.teacher)
        with torch.no_grad():
            logits = self.teacher.upsample(self.teacher(target)[LOGITS].float(), size)
            return pseudo_label_weight(logits, c.threshold, ignore_top=c.ignore_top, ignore_bottom=c.ignore_bottom,
                                       scale=c.pseudo_weight)

    def _mix(self, xs: Tensor, ys: Tensor, xt: Tensor, yt: Tensor, wt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ClassMix of each source image onto its target image: (images, labels, weights)."""
        classes = sample_mix_classes(ys.unsqueeze(1), generator=self._generator, batch_union=self.cfg.batch_union)
        images, labels, weights = [], [], []
        for i, chosen in enumerate(classes):
            mask = class_mix_mask(ys[i], chosen.to(ys.device))
            images.append(class_mix(mask, xs[i], xt[i]))
            labels.append(class_mix(mask, ys[i], yt[i]))
            weights.append(class_mix(mask, torch.ones_like(wt[i]), wt[i]))
        return torch.stack(images), torch.stack(labels), torch.stack(weights)

    def source_terms(self, out: dict[str, Any], xs: Tensor, ys: Tensor) -> StepOutput:
        """The student's supervision on the source batch: cross-entropy over every pixel (DAFormer adds FD)."""
        del xs
        ce = weighted_pixel_ce(self.model.upsample(out[LOGITS], tuple(ys.shape[-2:])), ys,
                               ignore_index=self.cfg.ignore_index)
        return StepOutput(loss=ce, terms={"ce": float(ce.detach())})

    def mix_terms(self, out: dict[str, Any], labels: Tensor, weights: Tensor) -> StepOutput:
        """The student's weighted cross-entropy on the mixed images (PGPC adds its contrast there)."""
        ce = weighted_pixel_ce(self.model.upsample(out[LOGITS], tuple(labels.shape[-2:])), labels, weights,
                               ignore_index=self.cfg.ignore_index)
        return StepOutput(loss=ce, terms={"ce_mix": float(ce.detach())})

    def training_step(self, batch: dict[str, Tensor]) -> StepOutput:
        xs, ys, xt = batch["source_image"], batch["source_label"], batch["target_image"]
        out = self.source_terms(self.model(xs), xs, ys)
        yt, wt = self._pseudo_labels(xt, tuple(ys.shape[-2:]))
        images, labels, weights = self._mix(xs, ys, xt, yt, wt)
        mixed = self.mix_terms(self.model(self._augment(images)), labels, weights)
        out.loss = out.loss + mixed.loss
        out.terms.update(mixed.terms)
        out.terms["pseudo_weight"] = float(wt.max()) if wt.numel() else 0.0
        return out
