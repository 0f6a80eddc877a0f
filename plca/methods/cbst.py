"""CBST (Zou et al., ECCV 2018): class-balanced self-training, in rounds. Each round's `pseudo` stage runs this
module's policy, `class_balanced`, on the previous round's model: per class the threshold lambda_c that keeps the
`portion` most confident of its predictions (`plca.pseudo.class_balanced_thresholds`, every 4th pixel per class and
image as the released code), and a target pixel is labelled argmax_c p_c / lambda_c where that ratio is >= 1
(`hard_pseudo_labels`), else ignored. The round's training stage (`runs.rounds`) then trains this module's method on
the source labels and the pseudo-labelled target images together, from the previous round's model.

The rounds are DVC stages wired in params (the `cbst_*` variants, `pseudo.cbst_p*`): round r's portion is the
released code's 0.2 + 0.05 (r - 1). CBST-SP is the same rounds on sets with `spatial_prior` (`cbst_sp_*`,
`pseudo.cbst_sp_p*`): the policy's probabilities are then multiplied by the source's spatial prior
(`Policy.probabilities`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from plca.data.labels import IGNORE_INDEX
from plca.engine.contract import Method, StepOutput
from plca.labelling import Policy, Selection, SoftLabels, register_policy
from plca.losses import one_hot_labels, self_training_loss
from plca.methods.registry import register
from plca.models.output import LOGITS, class_argmax
from plca.pseudo import (
    class_confidence_samples,
    hard_pseudo_labels,
    mining_from_counts,
    soft_pseudo_labels,
    thresholds_from_samples,
)


@dataclass
class ClassBalancedConfig:
    #: The share of each class's predictions kept (CRST code: 0.2 in round 1, + 0.05 a round, at most 0.5).
    portion: float = 0.2
    #: Every ds_rate-th pixel of a class in an image enters its threshold (the code: 4; the paper: 1, all).
    ds_rate: int = 4
    #: "cb": one threshold per class (CBST); "global": one for all classes (the ST baseline).
    policy: Literal["cb", "global"] = "cb"
    #: The CBST MXNet code's placeholder zero in each class list.
    cbst_mxnet: bool = False
    #: Keep p / lambda > 1 (the paper) instead of >= 1 (the code).
    strict: bool = False
    #: Classes with a predicted share below this are "mine" classes (recorded in the set's summary).
    mine_port: float = 1e-3
    rare_cls_num: int = 3
    #: CRST's label regularisation LRENT: > 0 gives soft labels with this alpha (the code's lr_weight_ent, 0.25 in
    #: lrent.sh; `plca.pseudo.soft_pseudo_labels`), which the round learns from; 0 = hard labels (CBST, CRST-MR).
    lrent: float = 0.0
    #: Set by a policy whose labels are its own, not LRENT's: why `lrent` does not apply to it.
    lrent_refused: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.lrent < 0:
            raise ValueError(f"lrent must be >= 0 (0 = hard labels; CRST's LRENT: 0.25), got {self.lrent}")
        if self.lrent and self.lrent_refused:
            raise ValueError(self.lrent_refused)


@register_policy(ClassBalancedConfig)
class ClassBalanced(Policy):
    """Every image labelled where its prediction clears its class threshold; the thresholds from the whole set."""

    name: ClassVar[str] = "class_balanced"
    takes_prior: ClassVar[bool] = True
    cfg: ClassBalancedConfig

    def __init__(self, cfg: ClassBalancedConfig) -> None:
        super().__init__(cfg)
        self._names: list[str] = []
        self._scores: list[float] = []
        self._cls: list[torch.Tensor] = []
        self._conf: list[torch.Tensor] = []
        self._counts: torch.Tensor | None = None
        self.thresholds: torch.Tensor | None = None

    def observe(self, names: list[str], logits: torch.Tensor) -> None:
        probs = self.probabilities(logits)
        cls, conf = class_confidence_samples(probs, ds_rate=self.cfg.ds_rate)
        self._cls.append(cls.cpu())
        self._conf.append(conf.cpu())
        counts = torch.bincount(class_argmax(probs).flatten(), minlength=probs.shape[1]).cpu().double()
        self._counts = counts if self._counts is None else self._counts + counts
        self._names += names
        self._scores += probs.amax(1).mean(dim=(1, 2)).tolist()  # mean confidence, recorded per image

    def fit_thresholds(self) -> torch.Tensor:
        """The class thresholds from every image observed (computed once)."""
        if self.thresholds is None:
            cfg = self.cfg
            self.thresholds = thresholds_from_samples(torch.cat(self._cls), torch.cat(self._conf), len(self._counts),
                                                      cfg.portion, policy=cfg.policy, cbst_mxnet=cfg.cbst_mxnet)
        return self.thresholds

    def select(self) -> Selection:
        cfg = self.cfg
        self.fit_thresholds()
        rare, mine = mining_from_counts(self._counts, mine_port=cfg.mine_port, rare_cls_num=cfg.rare_cls_num)
        return Selection(
            labelled=list(self._names), unlabelled=[], scores=dict(zip(self._names, self._scores, strict=True)),
            summary={"thresholds": [float(t) for t in self.thresholds], "mine_classes": mine.tolist(),
                     "rare_classes": rare.tolist()},
        )

    def label(self, name: str, logits: torch.Tensor) -> np.ndarray | SoftLabels:
        thresholds = self.thresholds.to(logits.device)
        if self.cfg.lrent > 0:  # LRENT keeps its own pixels (its rule, not p / lambda >= 1) and soft weights
            soft, labels = soft_pseudo_labels(self.probabilities(logits)[None], thresholds, self.cfg.lrent)
            return SoftLabels(hard=labels[0].to(torch.uint8).cpu().numpy(), soft=soft[0].cpu().numpy())
        labels = hard_pseudo_labels(self.probabilities(logits)[None], thresholds, strict=self.cfg.strict)[0]
        return labels.to(torch.uint8).cpu().numpy()


@dataclass
class CBSTConfig:
    #: CRST's model regularisation of the target prediction ("none" = CBST; kld = MRKLD, ent = MRENT, l2 = MRL2).
    regularizer: Literal["none", "kld", "ent", "l2"] = "none"
    #: Its weight (CRST code: mr_weight_kld 0.1).
    weight: float = 0.0
    #: The released code's image weights: `weight` on target images, 0 on source ones, so the regulariser's
    #: effective weight is weight^2 (false: weight per target pixel, the paper's alpha).
    code_image_weights: bool = True
    ignore_index: int = IGNORE_INDEX


@register(CBSTConfig)
class CBST(Method):
    """Source labels and target pseudo-labels in one batch: CE over every labelled pixel of both (the code's
    normalisation), plus CRST's regulariser on the target images."""

    name: ClassVar[str] = "cbst"
    #: The target stream of a round carries the pseudo-labels of its set (`runs.rounds`).
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: CBSTConfig

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        if "target_label" not in batch:
            raise ValueError(f"{self.name}: the target stream has no pseudo-labels; train it as a round "
                             "(params runs.rounds) on a pseudo-label set")
        size_s, size_t = tuple(batch["source_label"].shape[1:]), tuple(batch["target_label"].shape[1:])
        if size_s != size_t:
            raise ValueError(f"{self.name}: source and target crops differ in size ({size_s} vs {size_t}); the "
                             "released code trains them in one batch: give data.target_transform the source's crop")
        labels = torch.cat([batch["source_label"], batch["target_label"]])
        logits = torch.cat([self.model(batch[f"{s}_image"])[LOGITS] for s in ("source", "target")])
        logits = self.model.upsample(logits, tuple(labels.shape[-2:])).float()
        n_source = len(batch["source_label"])
        target = labels
        if "target_soft_label" in batch:  # LRENT's soft labels: the source's labels one-hot beside them
            one_hot = one_hot_labels(batch["source_label"], logits.shape[1], ignore_index=cfg.ignore_index,
                                     dtype=logits.dtype)
            target = torch.cat([one_hot, batch["target_soft_label"].to(logits.dtype)])
        weights = None
        if cfg.regularizer != "none":
            target_weight = cfg.weight if cfg.code_image_weights else 1.0
            weights = torch.tensor([0.0] * n_source + [target_weight] * (len(labels) - n_source),
                                   device=logits.device)
        loss = self_training_loss(logits, target, regularizer=cfg.regularizer, weight=cfg.weight,
                                  image_weights=weights, ignore_index=cfg.ignore_index)
        labelled = labels[n_source:] != cfg.ignore_index
        return StepOutput(loss=loss, terms={"st_loss": float(loss.detach()),
                                            "target_labelled": float(labelled.float().mean())})
