"""IntraDA (Pan et al., CVPR 2020): inter-domain AdvEnt, then an entropy ranking of the target images, then
intra-domain AdvEnt from the confident ("easy") target images to the rest ("hard").

Its three steps are three DVC stages wired in params (see the `intrada` variants): stage 1 trains AdvEnt
(`plca.methods.advent`) on source and target for half the steps; the `pseudo` stage runs this module's policy,
`entropy_rank`, on the stage-1 model: every target train image scored by its mean normalised entropy
(`plca.pseudo.image_entropy`, optionally with the rare-class factor), split stable-ascending at lambda = 0.67
(`entropy_rank_split`), the easy images labelled with the argmax of the stage-1 prediction (no threshold, no
ignore); stage 2 trains AdvEnt again for the other half with the easy images and their pseudo-labels as the
labelled stream and the hard images as the target, restarting from the stage-1 initial weights (the released
config; authors, IntraDA issue #4) with fresh discriminators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from plca.labelling import Policy, Selection, register_policy
from plca.models.output import class_argmax
from plca.pseudo import CITYSCAPES_RARE_CLASSES, EASY_RATIO, entropy_rank_split, image_entropy


@dataclass
class EntropyRankConfig:
    #: lambda: the easy share, int(N * ratio) images (IntraDA: 0.67).
    ratio: float = EASY_RATIO
    #: The released code's "entropy normalisation" (its README's `--normalize`): scores x ((K - k)/K + 0.5) with
    #: k of the K Cityscapes rare classes present in the prediction. Off as the code's default (flag absent).
    rare_classes: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio: expected a share in (0, 1), got {self.ratio}")


@register_policy(EntropyRankConfig)
class EntropyRank(Policy):
    """IntraDA's ranking: easy = the lowest-entropy images, labelled with their argmax; hard = the rest."""

    name: ClassVar[str] = "entropy_rank"
    cfg: EntropyRankConfig

    def __init__(self, cfg: EntropyRankConfig) -> None:
        super().__init__(cfg)
        self._names: list[str] = []
        self._scores: list[torch.Tensor] = []

    def observe(self, names: list[str], logits: torch.Tensor) -> None:
        rare = CITYSCAPES_RARE_CLASSES if self.cfg.rare_classes else None
        self._names += names
        self._scores.append(image_entropy(logits, rare).cpu())

    def select(self) -> Selection:
        scores = torch.cat(self._scores)
        easy, hard = entropy_rank_split(scores, self.cfg.ratio)
        return Selection(
            labelled=[self._names[i] for i in easy.tolist()],
            unlabelled=[self._names[i] for i in hard.tolist()],
            scores={n: float(s) for n, s in zip(self._names, scores.tolist(), strict=True)},
            summary={"threshold_score": float(scores[easy[-1]]) if len(easy) else None},
        )

    def label(self, name: str, logits: torch.Tensor) -> np.ndarray:
        return class_argmax(logits, 0).to(torch.uint8).cpu().numpy()
