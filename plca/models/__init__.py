"""Segmentation networks: DeepLab-v2 on a dilated ResNet backbone."""

from plca.models.deeplabv2 import ASPPClassifier, DeepLabV2, DeepLabV2Config, build_model
from plca.models.resnet import FrozenBatchNorm2d, ResNet, WeightsError, load_imagenet_weights

__all__ = [
    "ASPPClassifier",
    "DeepLabV2",
    "DeepLabV2Config",
    "FrozenBatchNorm2d",
    "ResNet",
    "WeightsError",
    "build_model",
    "load_imagenet_weights",
]
