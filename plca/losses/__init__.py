"""PLCA's losses: association (Eq 1-10), adaptive label smoothing (Eq 13), Lovasz-softmax and cross-entropy;
ADVENT's entropy (MinEnt), the output-space adversarial losses (AdaptSegNet, AdvEnt, IntraDA) and the self-training
loss (CBST, CRST's regularisers, TPLD's bootstrapping), the mean-teacher losses (DACS / DAFormer pseudo-label
weight, all-pixel CE, ImageNet feature distance) and PGPC's pixel contrast (CLUDA's loss) for baselines."""

from plca.losses.adversarial import SOURCE_LABEL, TARGET_LABEL, adversarial_loss, self_information_map
from plca.losses.association import (
    AssociationConfig,
    AssociationResult,
    associate,
    association_loss,
    downsample_labels,
    spatial_aggregate,
)
from plca.losses.contrast import contrast_inputs, pixel_contrast_loss
from plca.losses.cross_entropy import cross_entropy
from plca.losses.entropy import entropy_loss, entropy_map
from plca.losses.lovasz import lovasz_softmax
from plca.losses.lsr import adaptive_lsr
from plca.losses.mean_teacher import (
    THING_CLASSES,
    downscale_label_ratio,
    feature_distance,
    pseudo_label_weight,
    weighted_pixel_ce,
)
from plca.losses.self_training import REGULARIZERS, one_hot_labels, self_training_loss

__all__ = [
    "AssociationConfig",
    "AssociationResult",
    "REGULARIZERS",
    "SOURCE_LABEL",
    "TARGET_LABEL",
    "THING_CLASSES",
    "adaptive_lsr",
    "adversarial_loss",
    "associate",
    "association_loss",
    "contrast_inputs",
    "cross_entropy",
    "downsample_labels",
    "downscale_label_ratio",
    "entropy_loss",
    "entropy_map",
    "feature_distance",
    "lovasz_softmax",
    "one_hot_labels",
    "pixel_contrast_loss",
    "pseudo_label_weight",
    "self_information_map",
    "self_training_loss",
    "spatial_aggregate",
    "weighted_pixel_ce",
]
