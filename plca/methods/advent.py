"""AdvEnt (ADVENT, Vu et al., CVPR 2019, Sec. 3.2): adversarial entropy minimisation. Each level's discriminator
reads the weighted self-information map (`plca.losses.self_information_map`, Eq. 4 as the released code: over
log C) of the logits upsampled to the input size; BCE loss; defaults = the released multi-level config
(valeoai/ADVENT, spec adversarial.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from plca.losses import self_information_map
from plca.methods.base import OutputSpaceAdversarial, OutputSpaceAdversarialConfig
from plca.methods.registry import register


@dataclass
class AdvEntConfig(OutputSpaceAdversarialConfig):
    """The shared options (`OutputSpaceAdversarialConfig`); ADVENT's lambda_adv: main 0.001, aux 0.0002."""


@register(AdvEntConfig)
class AdvEnt(OutputSpaceAdversarial):
    name: ClassVar[str] = "advent"
    cfg: AdvEntConfig

    def discriminator_input(self, logits: Tensor) -> Tensor:
        return self_information_map(logits)
