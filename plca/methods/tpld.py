"""TPLD (Shin et al., ECCV 2020): two-phase pseudo-label densification, on top of CRST-MRKLD. No code was
released; every detail below that no source gives is the spec's reading (spec self-training.md, marked "ours"
there) and an option here.

Phase 1 (rounds `phase: 1`): CRST's training on source labels and pseudo-labelled target images, whose sets are
densified by voting (policy `class_balanced_vote`: CBST's class-balanced labels, then `plca.pseudo.vote_densify`
fills unlabelled pixels whose two best classes win the vote of their labelled 3x3 neighbours), with the target
term bootstrapped (`plca.losses.self_training_loss`, `bootstrap`: beta).

Phase 2 (a round with `phase: 1` replaced by `phase: 2`, `labelled: pseudo`): the policy `easy_hard` scores every
target image by its confidence (`image_confidence`: per predicted class, the share of its pixels above the class
threshold over the threshold, averaged), the top q are the easy images, labelled in full (`full_pseudo_labels`:
one-hot where the threshold is cleared, r_c^gamma for every class elsewhere), the rest the hard ones. The round
learns the easy images with the bootstrapped loss and MRKLD, and aligns the hard images to the easy ones with an
output-space discriminator on the self-information maps (AdvEnt's, IntraDA's hard-to-easy game). Ours: phase 2
reads no source image (the easy images are its labelled stream, as IntraDA's stage 2); one discriminator level.

The rounds are DVC stages wired in params (the `tpld*` variants, `pseudo.tpld_p*`): the paper's 6 + 3 rounds
(unconfirmed) as 2 + 1 in the default, the same steps as every row. The published q: 30%, + 5% a round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from plca.engine.contract import StepOutput
from plca.engine.optim import OptimConfig
from plca.labelling import Selection, SoftLabels, register_policy
from plca.losses import self_information_map, self_training_loss
from plca.methods.base import adversarial_terms, discriminator_optim
from plca.methods.cbst import ClassBalanced, ClassBalancedConfig
from plca.methods.crst import CRST, CRSTConfig
from plca.methods.registry import register
from plca.models import fc_discriminator
from plca.models.output import LOGITS
from plca.pseudo import (
    full_pseudo_labels,
    hard_pseudo_labels,
    image_confidence,
    split_easy_hard,
    vote_densify,
)


@dataclass
class VoteConfig(ClassBalancedConfig):
    #: The voting neighbourhood, window x window pixels (ours: 3).
    window: int = 3
    #: The weight of the neighbours' pooled ratio in the vote (0.7; which term it weighs: ours).
    alpha: float = 0.7
    #: Voting passes, each reading the labels of the previous one (3).
    iterations: int = 3
    lrent_refused: ClassVar[str | None] = (
        "class_balanced_vote: lrent (soft labels) does not apply; voting densifies hard labels")


@register_policy(VoteConfig)
class ClassBalancedVote(ClassBalanced):
    """TPLD phase 1: CBST's class-balanced labels of every image, densified by voting (`vote_densify`)."""

    name: ClassVar[str] = "class_balanced_vote"
    cfg: VoteConfig

    def label(self, name: str, logits: Tensor) -> np.ndarray:
        cfg = self.cfg
        probs = self.probabilities(logits)[None]
        thresholds = self.thresholds.to(logits.device)
        labels = hard_pseudo_labels(probs, thresholds, strict=cfg.strict)
        dense = vote_densify(probs, thresholds, labels, window=cfg.window, alpha=cfg.alpha, iterations=cfg.iterations)
        return dense[0].to(torch.uint8).cpu().numpy()


@dataclass
class EasyHardConfig(ClassBalancedConfig):
    #: The easy share: the top floor(q N) images by confidence (the paper: 30%, + 5% a round).
    q: float = 0.3
    #: The exponent of the full labels' non-confident pixels, r_c^gamma (ours: 2).
    gamma: float = 2.0
    lrent_refused: ClassVar[str | None] = "easy_hard: lrent does not apply; the easy images get TPLD's full labels"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"easy_hard: q must be a share in (0, 1), got {self.q}")


@register_policy(EasyHardConfig)
class EasyHard(ClassBalanced):
    """TPLD phase 2: the class thresholds from the whole set (pass 1), every image's confidence under them (the
    review pass), the top q easy (labelled in full, soft), the rest hard (unlabelled)."""

    name: ClassVar[str] = "easy_hard"
    reviews: ClassVar[bool] = True
    cfg: EasyHardConfig

    def __init__(self, cfg: EasyHardConfig) -> None:
        super().__init__(cfg)
        self._confidence: list[float] = []

    def review(self, names: list[str], logits: Tensor) -> None:
        thresholds = self.fit_thresholds().to(logits.device)
        self._confidence += image_confidence(self.probabilities(logits), thresholds).tolist()

    def select(self) -> Selection:
        base = super().select()  # the same thresholds (from the same samples) and the mining classes
        if len(self._confidence) != len(self._names):
            raise RuntimeError(f"{self.name}: reviewed {len(self._confidence)} images of {len(self._names)}")
        easy = split_easy_hard(torch.tensor(self._confidence, dtype=torch.float64), self.cfg.q).tolist()
        labelled = [n for n, e in zip(self._names, easy, strict=True) if e]
        return Selection(
            labelled=labelled, unlabelled=[n for n, e in zip(self._names, easy, strict=True) if not e],
            scores=dict(zip(self._names, self._confidence, strict=True)),
            summary={**base.summary, "easy_min_confidence": min(
                (c for c, e in zip(self._confidence, easy, strict=True) if e), default=None)},
        )

    def label(self, name: str, logits: Tensor) -> SoftLabels:
        probs = self.probabilities(logits)[None]
        thresholds = self.thresholds.to(logits.device)
        hard = hard_pseudo_labels(probs, thresholds, strict=self.cfg.strict)[0]
        full = full_pseudo_labels(probs, thresholds, self.cfg.gamma)[0]
        return SoftLabels(hard=hard.to(torch.uint8).cpu().numpy(), soft=full.cpu().numpy())


@dataclass
class TPLDConfig(CRSTConfig):
    #: 1: CRST on source and the voted target labels; 2: the easy images (full labels) and hard-to-easy alignment.
    phase: Literal[1, 2] = 1
    #: beta of the bootstrapped target loss; no source gives its value (ours: 0.95, the soft bootstrapping of
    #: Reed et al., ICLR 2015 workshop); null = plain cross-entropy (CRST's).
    bootstrap: float | None = 0.95
    #: Phase 2: lambda_adv of the hard-to-easy game (ours: AdvEnt's main level, 0.001), the discriminator's base
    #: width and optimiser (AdvEnt's).
    w_adv: float = 0.001
    ndf: int = 64
    d_optim: OptimConfig = field(default_factory=discriminator_optim)

    def __post_init__(self) -> None:
        if self.bootstrap is not None and not 0.0 <= self.bootstrap <= 1.0:
            raise ValueError(f"bootstrap must be in [0, 1] (or null: plain cross-entropy), got {self.bootstrap}")


@register(TPLDConfig)
class TPLD(CRST):
    name: ClassVar[str] = "tpld"
    cfg: TPLDConfig

    def __init__(self, model: nn.Module, cfg: TPLDConfig) -> None:
        super().__init__(model, cfg)
        self.thresholds: Tensor | None = None
        self.discriminators: dict[str, nn.Module] = {}
        if cfg.phase == 2:
            self.discriminators["d_main"] = fc_discriminator(model.cfg.num_classes, cfg.ndf)

    def set_pseudo_labels(self, summary: dict[str, Any]) -> None:
        if "thresholds" in summary:
            self.thresholds = torch.tensor(summary["thresholds"], dtype=torch.float32)

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model, **self.discriminators}

    def optimizers(self, base: OptimConfig) -> dict[str, OptimConfig]:
        return {"model": base, **{name: self.cfg.d_optim for name in self.discriminators}}

    def _thresholds(self) -> Tensor:
        if self.thresholds is None:
            raise ValueError(f"{self.name}: bootstrapping needs the class thresholds of the round's pseudo-label "
                             "set (its summary.json has none); use a class-balanced policy, or bootstrap: null")
        return self.thresholds

    def target_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The pseudo-labelled target images' term: (bootstrapped) CE + the model regulariser (MRKLD) with the
        code's image weights; mean over their valid pixels."""
        cfg = self.cfg
        weights = None
        if cfg.regularizer != "none":
            weights = torch.full((len(logits),), cfg.weight if cfg.code_image_weights else 1.0, device=logits.device)
        thresholds = None if cfg.bootstrap is None else self._thresholds()
        return self_training_loss(logits, target, regularizer=cfg.regularizer, weight=cfg.weight,
                                  image_weights=weights, bootstrap=cfg.bootstrap, thresholds=thresholds,
                                  ignore_index=cfg.ignore_index)

    def training_step(self, batch: dict[str, Tensor]) -> StepOutput:
        if self.cfg.phase == 2:
            return self._phase_two(batch)
        if self.cfg.bootstrap is None:  # CRST's step exactly
            return super().training_step(batch)
        return self._phase_one(batch)

    def _phase_one(self, batch: dict[str, Tensor]) -> StepOutput:
        """Source CE and the bootstrapped target term, each a sum over its valid pixels, divided by their total
        count (CBST's one mean over the batch's labelled pixels); the regulariser as CRST adds it."""
        cfg = self.cfg
        if "target_label" not in batch:
            raise ValueError(f"{self.name}: the target stream has no pseudo-labels; train it as a round "
                             "(params runs.rounds) on a pseudo-label set")
        source, target = batch["source_label"], batch["target_label"]
        size = tuple(source.shape[-2:])
        logits_s, logits_t = (self.model.upsample(self.model(batch[f"{s}_image"])[LOGITS], size).float()
                              for s in ("source", "target"))
        n_s = (source != cfg.ignore_index).sum()
        n_t = (target != cfg.ignore_index).sum()
        total = (n_s + n_t).clamp(min=1).to(logits_s.dtype)
        ce_s = self_training_loss(logits_s, source, ignore_index=cfg.ignore_index)
        main_t = self_training_loss(logits_t, target, bootstrap=cfg.bootstrap, thresholds=self._thresholds(),
                                    ignore_index=cfg.ignore_index)
        reg = torch.zeros((), device=logits_t.device)
        if cfg.regularizer != "none":  # the regulariser keeps its own normalisation (target pixels, image weights)
            reg = self.target_loss(logits_t, target) - main_t
        loss = (n_s * ce_s + n_t * main_t) / total + reg
        return StepOutput(loss=loss, terms={"st_loss": float(loss.detach()), "reg": float(reg.detach()),
                                            "target_labelled": float((target != cfg.ignore_index).float().mean())})

    def _phase_two(self, batch: dict[str, Tensor]) -> StepOutput:
        """The easy images (the labelled stream, full soft labels) through `target_loss`; the hard ones (the
        target stream) aligned to them: lambda_adv x generator + discriminator on self-information maps."""
        cfg = self.cfg
        if "source_soft_label" not in batch:
            raise ValueError(f"{self.name}: phase 2 learns the easy images' full (soft) labels; train it on an "
                             "easy_hard set with labelled: pseudo")
        xe, xh = batch["source_image"], batch["target_image"]
        soft = batch["source_soft_label"]
        logits_e, logits_h = self.model(xe)[LOGITS], self.model(xh)[LOGITS]
        up_e = self.model.upsample(logits_e, tuple(soft.shape[-2:])).float()
        loss = self.target_loss(up_e, soft.to(up_e.dtype))
        terms = {"st_loss": float(loss.detach())}
        maps = [self_information_map(self.model.upsample(lg, tuple(x.shape[-2:])))
                for lg, x in ((logits_e, xe), (logits_h, xh))]
        gen, disc = adversarial_terms(self.discriminators["d_main"], *maps)
        terms.update(adv_main=float(gen.detach()), d_main=float(disc.detach()))
        return StepOutput(loss=loss + cfg.w_adv * gen + disc, terms=terms)
