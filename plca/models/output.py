"""The one output contract of every segmentation network, and where upsampling is chosen.

A network's forward returns a dict: "features" (the map its classifier reads), "logits" (class scores at the
feature grid), optionally "aux_logits" (an auxiliary head, DeepLab-v2 multi-level methods) and "feature_maps"
(every stage's map, a MiT encoder). `SegmentationModel.upsample` brings logits or probabilities to a label or crop
size with the network's own interpolation (bilinear; `align_corners` as its released code), so a method or the
evaluation never picks one itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FEATURES = "features"
LOGITS = "logits"
AUX_LOGITS = "aux_logits"
FEATURE_MAPS = "feature_maps"


def class_argmax(x: Tensor, dim: int = 1) -> Tensor:
    """The index of the largest class score along `dim` (the first on ties), as `x.argmax(dim)`: torch's CPU argmax
    over a dimension that is not the innermost is about 3x slower than `max(dim).indices`, whose ties also go to
    the first index (the class maps of pseudo-labels and evaluation are such reductions)."""
    return x.max(dim=dim).indices


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

    def per_sample(self) -> bool:
        """Whether each image's outputs depend on that image alone: no BatchNorm computes batch statistics now
        (GroupNorm, LayerNorm and BatchNorm in eval mode do not mix images)."""
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.modules())


def forward_pair(model: SegmentationModel, x_a: Tensor, x_b: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`model(x_a), model(x_b)`, as one forward pass of both batches stacked when that changes nothing but speed
    (the model is per-sample and the images have one shape): on the CPU's toy network one pass of 8 images takes
    about 0.75x the time of two of 4. A BatchNorm in training mode gets two passes, each batch its own statistics,
    as the released codes do."""
    if not model.per_sample() or x_a.shape[1:] != x_b.shape[1:]:
        return model(x_a), model(x_b)
    out = model(torch.cat([x_a, x_b]))
    n = x_a.shape[0]

    def part(sl: slice) -> dict[str, Tensor]:  # a value is a map or a list of maps (FEATURE_MAPS)
        return {k: [m[sl] for m in v] if isinstance(v, (list, tuple)) else v[sl] for k, v in out.items()}

    return part(slice(None, n)), part(slice(n, None))
