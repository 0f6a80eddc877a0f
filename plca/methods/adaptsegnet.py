"""AdaptSegNet (Tsai et al., CVPR 2018): output-space adversarial adaptation. Each level's discriminator reads the
softmax of the logits upsampled to the input size; defaults = the released multi-level script
(wasidennis/AdaptSegNet, spec adversarial.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from plca.losses.adversarial import GAN
from plca.methods.base import OutputSpaceAdversarial, OutputSpaceAdversarialConfig
from plca.methods.registry import register
from plca.models.output import SegmentationModel


@dataclass
class AdaptSegNetConfig(OutputSpaceAdversarialConfig):
    """The shared options (`OutputSpaceAdversarialConfig`: multi_level, w_adv_main 0.001, w_adv_aux 0.0002,
    w_seg_aux 0.1, ndf 64, d_optim Adam 1e-4 (0.9, 0.99), lovasz off) plus the GAN loss. Other released recipes:
    README, PyTorch >= 0.4 multi-level: w_adv_aux 5e-5, w_adv_main 5e-4; LS-GAN: gan "ls", multi_level false,
    w_adv_main 0.01."""

    #: "bce" (vanilla, the paper) or "ls" (least squares, --gan LS).
    gan: GAN = "bce"


@register(AdaptSegNetConfig)
class AdaptSegNet(OutputSpaceAdversarial):
    name: ClassVar[str] = "adaptsegnet"
    cfg: AdaptSegNetConfig

    def __init__(self, model: SegmentationModel, cfg: AdaptSegNetConfig) -> None:
        super().__init__(model, cfg)
        self.gan = cfg.gan

    def discriminator_input(self, logits: Tensor) -> Tensor:
        """X = softmax over classes (AdaptSegNet Sec. 3.1: P = G(I))."""
        return logits.softmax(1)
