"""The one output contract of every segmentation network, and where upsampling is chosen.

A network's forward returns a dict: "features" (the map its classifier reads), "logits" (class scores at the
feature grid), optionally "aux_logits" (an auxiliary head, DeepLab-v2 multi-level methods) and "feature_maps"
(every stage's map, a MiT encoder). `SegmentationModel.upsample` brings logits or probabilities to a label or crop
size with the network's own interpolation (bilinear; `align_corners` as its released code), so a method or the
evaluation never picks one itself.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

FEATURES = "features"
LOGITS = "logits"
AUX_LOGITS = "aux_logits"
FEATURE_MAPS = "feature_maps"


def upsample(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of [N, C, h, w] to `size` (h, w); returned as is when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class SegmentationModel(nn.Module):
    """Base of the pipeline's networks: `forward(x) -> dict` (see the module docstring), `classify(features)`
    runs the head alone (test-time aggregation), `upsample` is the network's interpolation."""

    #: The released codes differ: DeepLab-v2 based ones (AdaptSegNet, ADVENT) use True, torch's default is False.
    align_corners: bool = False

    def classify(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def upsample(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return upsample(x, size, self.align_corners)
