"""CRST (Zou et al., ICCV 2019): CBST's rounds (`plca.methods.cbst`: the class-balanced pseudo-labels, the same
training on source and pseudo-labelled target images) with a model regulariser on the target prediction, MRKLD
by default as the released code (`mrkld.sh`: mr_weight_kld 0.1, image weights = that weight on target images).
MRENT and MRL2 (the paper only) are the `regularizer` option. The label regulariser LRENT is the rounds' pseudo-label
sets' option (`lrent`: soft labels, `plca.methods.cbst.ClassBalancedConfig`), which the method learns from with the
soft cross-entropy whenever its batch has them: LRENT alone with `regularizer: none`, MRKLD + LRENT with the default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from plca.methods.cbst import CBST, CBSTConfig
from plca.methods.registry import register


@dataclass
class CRSTConfig(CBSTConfig):
    regularizer: Literal["none", "kld", "ent", "l2"] = "kld"
    weight: float = 0.1


@register(CRSTConfig)
class CRST(CBST):
    name: ClassVar[str] = "crst"
    cfg: CRSTConfig
