"""What several methods share: source supervision (Eq. 14's first two terms), the multi-level segmentation loss
and the output-space adversarial game of AdaptSegNet and ADVENT (spec adversarial.md), and the method class those
two build on. The method contract itself (`Method`, `StepOutput`, `TrainContext`) is the engine's:
`plca.engine.contract`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from plca.data.labels import IGNORE_INDEX
from plca.engine.contract import Method, StepOutput
from plca.engine.distributed import LOCAL, Reducer
from plca.engine.optim import OptimConfig
from plca.losses import SOURCE_LABEL, TARGET_LABEL, adversarial_loss, cross_entropy, lovasz_softmax
from plca.losses.adversarial import GAN
from plca.models import fc_discriminator
from plca.models.output import AUX_LOGITS, LOGITS, SegmentationModel


def source_supervision(model: SegmentationModel, logits: torch.Tensor, labels: torch.Tensor, *, lovasz: bool,
                       w_lov: float, ignore_index: int, reducer: Reducer = LOCAL) -> StepOutput:
    """CE (+ w_lov x Lovasz-softmax) of `model`'s logits upsampled to the label size by the model's own
    interpolation. Shared by every method that trains on source labels. `reducer`: over several processes, CE's
    mean over labelled pixels and Lovasz-softmax taken over the global batch (`engine.normalise: global`)."""
    up = model.upsample(logits, tuple(labels.shape[-2:]))
    ce = cross_entropy(up, labels, ignore_index=ignore_index)
    out = StepOutput(loss=ce, terms={"ce": float(ce.detach())})
    if reducer.global_:
        out.loss = ce * reducer.share((labels != ignore_index).sum())
    if lovasz:
        probs, lov_labels = reducer.gather(up.float().softmax(1), labels)
        lov = lovasz_softmax(probs, lov_labels, ignore_index=ignore_index)
        out.loss = out.loss + w_lov * lov
        out.terms["lovasz"] = float(lov.detach())
    return out


def segmentation_supervision(model: SegmentationModel, outputs: dict[str, Tensor], labels: Tensor, *, lovasz: bool,
                             w_lov: float, w_seg_aux: float, ignore_index: int) -> StepOutput:
    """The released multi-level codes' L_seg = CE(main) + w_seg_aux x CE(aux) (AdaptSegNet Eq. 3's
    sum_i lambda_seg^i L_seg^i; ADVENT: 0.1), each on logits upsampled to the label size, plus w_lov x Lovasz on
    the main level when `lovasz`. The aux term only when `outputs` has aux logits and w_seg_aux > 0."""
    out = source_supervision(model, outputs[LOGITS], labels, lovasz=lovasz, w_lov=w_lov, ignore_index=ignore_index)
    if AUX_LOGITS in outputs and w_seg_aux > 0:
        up = model.upsample(outputs[AUX_LOGITS], tuple(labels.shape[-2:]))
        ce_aux = cross_entropy(up, labels, ignore_index=ignore_index)
        out.loss = out.loss + w_seg_aux * ce_aux
        out.terms["ce_aux"] = float(ce_aux.detach())
    return out


def adversarial_terms(discriminator: nn.Module, x_source: Tensor, x_target: Tensor, gan: GAN = "bce"
                      ) -> tuple[Tensor, Tensor]:
    """(generator term, discriminator term) of one level (AdaptSegNet Eq. 4-5, ADVENT Eq. 5-6, with the released
    codes' labels: source 0, target 1). Generator: adv(D(X_t), source), built with D's parameters not requiring
    grad, so its gradient reaches the segmenter only. Discriminator: adv(D(X_s.detach()), source) / 2 +
    adv(D(X_t.detach()), target) / 2, which reaches D only. The caller adds lambda x generator + discriminator to
    the one objective the engine backpropagates."""
    params = list(discriminator.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        generator = adversarial_loss(discriminator(x_target), SOURCE_LABEL, gan)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    disc = (adversarial_loss(discriminator(x_source.detach()), SOURCE_LABEL, gan) / 2
            + adversarial_loss(discriminator(x_target.detach()), TARGET_LABEL, gan) / 2)
    return generator, disc


def discriminator_optim() -> OptimConfig:
    """The released codes' discriminator optimiser: Adam, lr 1e-4, betas (0.9, 0.99), no weight decay, poly."""
    return OptimConfig(name="adam", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)


@dataclass
class OutputSpaceAdversarialConfig:
    """Options shared by AdaptSegNet and AdvEnt; defaults = the released multi-level recipes."""

    #: Two levels (aux head on layer3 with its own D) as the released codes; off: the main level alone.
    multi_level: bool = True
    #: lambda_adv per level (released code: main 0.001, aux 0.0002).
    w_adv_main: float = 0.001
    w_adv_aux: float = 0.0002
    #: lambda_seg of the aux level (0.1); unused single-level.
    w_seg_aux: float = 0.1
    #: The discriminators' base width (64).
    ndf: int = 64
    #: The discriminators' optimiser (each D has its own, same settings).
    d_optim: OptimConfig = field(default_factory=discriminator_optim)
    #: Lovasz on the main source level (not in the released codes).
    lovasz: bool = False
    w_lov: float = 0.75
    ignore_index: int = IGNORE_INDEX


class OutputSpaceAdversarial(Method):
    """Segmenter + one fully convolutional discriminator per level (`d_main`, `d_aux` when multi-level), each
    reading a map of the prediction upsampled to the input size (`discriminator_input`, the subclass's choice).
    Objective: L_seg(source) + sum_l (lambda_l x generator_l + discriminator_l) (`adversarial_terms`)."""

    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: OutputSpaceAdversarialConfig
    #: The adversarial loss (`plca.losses.adversarial_loss`); AdaptSegNet makes it an option.
    gan: GAN = "bce"

    def __init__(self, model: SegmentationModel, cfg: OutputSpaceAdversarialConfig) -> None:
        super().__init__(model, cfg)
        num_classes = model.cfg.num_classes
        self.discriminators: dict[str, nn.Module] = {"d_main": fc_discriminator(num_classes, cfg.ndf)}
        if cfg.multi_level:
            self.discriminators["d_aux"] = fc_discriminator(num_classes, cfg.ndf)

    @classmethod
    def model_options(cls, cfg: Any) -> dict[str, Any]:
        return {"aux_head": True} if cfg.multi_level else {}

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model, **self.discriminators}

    def optimizers(self, base: OptimConfig) -> dict[str, OptimConfig]:
        return {"model": base, **{name: self.cfg.d_optim for name in self.discriminators}}

    def discriminator_input(self, logits: Tensor) -> Tensor:
        """The map D reads, from logits already upsampled to the input size."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor]) -> StepOutput:
        cfg = self.cfg
        xs, xt = batch["source_image"], batch["target_image"]
        out_s, out_t = self.model(xs), self.model(xt)
        levels = {"main": LOGITS}
        if cfg.multi_level:
            require_aux(out_s, self.name)
            levels["aux"] = AUX_LOGITS
        out = segmentation_supervision(self.model, out_s, batch["source_label"], lovasz=cfg.lovasz,
                                       w_lov=cfg.w_lov, w_seg_aux=cfg.w_seg_aux if cfg.multi_level else 0.0,
                                       ignore_index=cfg.ignore_index)
        weights = {"main": cfg.w_adv_main, "aux": cfg.w_adv_aux}
        for level, key in levels.items():
            maps = [self.discriminator_input(self.model.upsample(o[key], tuple(x.shape[-2:])))
                    for o, x in ((out_s, xs), (out_t, xt))]
            gen, disc = adversarial_terms(self.discriminators[f"d_{level}"], *maps, self.gan)
            out.loss = out.loss + weights[level] * gen + disc
            out.terms[f"adv_{level}"] = float(gen.detach())
            out.terms[f"d_{level}"] = float(disc.detach())
        return out


def require_aux(outputs: dict[str, Tensor], method: str) -> None:
    """Multi-level training needs the model's aux head (`Method.model_options` asks for it)."""
    if AUX_LOGITS not in outputs:
        raise ValueError(f"{method}: multi_level needs a model with an aux head (model option aux_head: true); "
                         f"or set multi_level: false")
