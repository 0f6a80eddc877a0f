"""Segmentation networks (DeepLab-v2 on a dilated ResNet backbone), their output contract, the EMA teacher, and
the output-space discriminator of the adversarial baselines."""

from plca.models.deeplabv2 import ASPPClassifier, DeepLabV2, DeepLabV2Config, build_model
from plca.models.discriminator import fc_discriminator
from plca.models.ema import ema_alpha, ema_init_, ema_update_
from plca.models.output import AUX_LOGITS, FEATURE_MAPS, FEATURES, LOGITS, SegmentationModel, upsample
from plca.models.resnet import FrozenBatchNorm2d, ResNet, WeightsError, load_imagenet_weights

__all__ = [
    "ASPPClassifier",
    "AUX_LOGITS",
    "DeepLabV2",
    "DeepLabV2Config",
    "FEATURES",
    "FEATURE_MAPS",
    "FrozenBatchNorm2d",
    "LOGITS",
    "ResNet",
    "SegmentationModel",
    "WeightsError",
    "build_model",
    "ema_alpha",
    "ema_init_",
    "ema_update_",
    "fc_discriminator",
    "load_imagenet_weights",
    "upsample",
]
