"""Segmentation networks (DeepLab-v2 on a dilated ResNet backbone; DAFormer on a MiT encoder), their output contract,
the EMA teacher, and the output-space discriminator of the adversarial baselines."""

from plca.models.daformer import DAFormer, DAFormerConfig, build_daformer
from plca.models.daformer_head import DAFormerHead
from plca.models.deeplabv2 import ASPPClassifier, DeepLabV2, DeepLabV2Config, build_model
from plca.models.discriminator import fc_discriminator
from plca.models.ema import ema_alpha, ema_init_, ema_update_, teacher_mode_
from plca.models.mit import MixVisionTransformer, load_mit_weights
from plca.models.output import AUX_LOGITS, FEATURE_MAPS, FEATURES, LOGITS, SegmentationModel, upsample
from plca.models.resnet import FrozenBatchNorm2d, ResNet, load_imagenet_weights
from plca.models.weights import WeightsError

__all__ = [
    "ASPPClassifier",
    "AUX_LOGITS",
    "DAFormer",
    "DAFormerConfig",
    "DAFormerHead",
    "DeepLabV2",
    "DeepLabV2Config",
    "FEATURES",
    "FEATURE_MAPS",
    "FrozenBatchNorm2d",
    "LOGITS",
    "MixVisionTransformer",
    "ResNet",
    "SegmentationModel",
    "WeightsError",
    "build_daformer",
    "build_model",
    "ema_alpha",
    "ema_init_",
    "ema_update_",
    "fc_discriminator",
    "load_imagenet_weights",
    "load_mit_weights",
    "teacher_mode_",
    "upsample",
]
