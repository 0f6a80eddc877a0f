"""PLCA (Kang et al., NeurIPS 2020): source supervision + pixel-level cycle association on features and
predictions + adaptive label smoothing, the full objective of Eq. 14. Each term has a switch for the ablations
of Table 1 (see params.yaml `variants`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from plca.data.labels import IGNORE_INDEX
from plca.engine.contract import Method, StepOutput
from plca.losses import adaptive_lsr, associate, downsample_labels
from plca.losses.constants import DEFAULT_ALPHA
from plca.methods.base import source_supervision
from plca.methods.registry import register
from plca.models.output import FEATURES, LOGITS, forward_pair


@dataclass
class PLCAConfig:
    #: Eq. 14 weights; the paper: 0.75, 0.1, 0.01.
    w_lov: float = 0.75
    w_ass: float = 0.1
    w_lsr: float = 0.01
    #: Spatial aggregation weight on the target (Eq. 7-8).
    alpha: float = DEFAULT_ALPHA
    #: Adaptive label smoothing threshold (Eq. 13).
    tau: float = 10.0
    lovasz: bool = True
    #: Feature-level association L_fass (Eq. 4).
    fass: bool = True
    #: Prediction-level association L_cass (Eq. 10).
    cass: bool = True
    #: Adaptive label smoothing on both domains (Eq. 13).
    lsr: bool = True
    #: Aggregate target features/predictions before associating ("SAGG"; off = "PLCA w/o SAGG").
    aggregate_target: bool = True
    #: Contrastive association (PLCA); off = Sim-PLCA, which raises raw similarities of associated pairs.
    contrastive: bool = True
    ignore_index: int = IGNORE_INDEX
    #: Association kernels: "auto" = batched dense on small grids (on a GPU up to the paper's 92x92, where it is
    #: twice as fast), memory-lean block-wise on large ones; "dense" or "blocked" to force one.
    impl: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (Eq. 7-8 mix a pixel with its neighbours), got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0 (Eq. 13's threshold), got {self.tau}")
        for key in ("w_lov", "w_ass", "w_lsr"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")

    @property
    def target_losses(self) -> bool:
        """Whether any term of the objective reads the target pass (a new target term belongs here too)."""
        return self.fass or self.cass or self.lsr


@register(PLCAConfig)
class PLCA(Method):
    name: ClassVar[str] = "plca"
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: PLCAConfig

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        xs, ys, xt = batch["source_image"], batch["source_label"], batch["target_image"]
        if cfg.target_losses:  # separate passes with BatchNorm in training, as the released code; else one
            out_s, out_t = forward_pair(self.model, xs, xt)
        else:
            out_s = self.model(xs)
            # With no target loss (the control), the target pass only moves normalisation statistics: no autograd.
            with torch.no_grad():
                out_t = self.model(xt)
        fs, ls, ft, lt = out_s[FEATURES], out_s[LOGITS], out_t[FEATURES], out_t[LOGITS]

        sup = source_supervision(self.model, ls, ys, lovasz=cfg.lovasz, w_lov=cfg.w_lov, ignore_index=cfg.ignore_index,
                                 reducer=self.reducer)
        loss, terms = sup.loss, sup.terms

        ys_grid = downsample_labels(ys, tuple(fs.shape[-2:]))
        common = dict(aggregate_target=cfg.aggregate_target, alpha=cfg.alpha, ignore_index=cfg.ignore_index,
                      contrastive=cfg.contrastive, impl=cfg.impl)
        for on, key, src, tgt, sim in (
            (cfg.fass, "fass", fs, ft, "cosine"),
            (cfg.cass, "cass", ls, lt, "kl"),
        ):
            if not on:
                continue
            if sim == "kl":
                src, tgt = src.float().softmax(1), tgt.float().softmax(1)
            res = associate(src.float(), tgt.float(), ys_grid, similarity=sim, **common)
            ass = res.loss
            if self.reducer.global_:  # several processes, engine.normalise global: the mean over all positives
                ass = ass * self.reducer.share(res.num_positive)
            loss = loss + cfg.w_ass * ass
            terms[key] = float(res.loss.detach())
            # Share of labelled source pixels whose cycle returns to their own class: is association doing anything?
            terms[f"{key}_pos_rate"] = res.num_positive / max(res.num_valid_source, 1)
        if cfg.lsr:
            lsr_s, lsr_t = adaptive_lsr(ls.float(), tau=cfg.tau), adaptive_lsr(lt.float(), tau=cfg.tau)
            loss = loss + cfg.w_lsr * (lsr_s + lsr_t)
            terms["lsr_s"], terms["lsr_t"] = float(lsr_s.detach()), float(lsr_t.detach())
        return StepOutput(loss=loss, terms=terms)
