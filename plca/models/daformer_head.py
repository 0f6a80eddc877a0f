"""DAFormer's decoder (Hoyer et al. 2022) in plain torch, with the released module names.

Per encoder stage an MLP embedding (mmseg's: tokens through Linear(C_i -> embed_dims), back to a map), every map
resized bilinearly (align_corners False) to the stride-4 size and concatenated; the fusion is an ASPP of
depthwise-separable convs (``fuse_layer``: a 1x1 ConvModule for dilation 1, a 3x3 depthwise dilated ConvModule then a
1x1 pointwise ConvModule for each other dilation; every conv bias-free + BatchNorm + ReLU), their concat through a
3x3 ``bottleneck`` ConvModule; then Dropout2d and the 1x1 classifier ``conv_seg``.

Keys: ``embed_layers.{i}.proj``, ``fuse_layer.aspp_modules.0.conv|bn``,
``fuse_layer.aspp_modules.{j}.depthwise_conv|pointwise_conv.conv|bn``, ``fuse_layer.bottleneck.conv|bn``,
``conv_seg``. Init as mmcv/mmseg: ConvModule convs He-normal (fan_out, relu), BatchNorm 1/0, the embedding Linears
torch's default, ``conv_seg`` N(0, 0.01) with bias 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

HEAD_INIT_STD = 0.01  # mmseg BaseDecodeHead: normal_init(conv_seg, std=0.01)
BN_EPS = 1e-5  # mmcv's BN norm_cfg keeps torch's defaults


class ConvModule(nn.Module):
    """mmcv's ConvModule with a BN norm_cfg: bias-free conv -> BatchNorm -> ReLU (keys ``conv``, ``bn``)."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int, padding: int = 0, dilation: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """3x3 depthwise dilated ConvModule on `cin` channels, then a 1x1 pointwise ConvModule to `cout`."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class MLPEmbed(nn.Module):
    """mmseg's MLP: a map [B, C, h, w] as tokens through Linear(C -> embed_dim), returned as a map."""

    def __init__(self, cin: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(b, -1, h, w)


class SepASPP(nn.Module):
    """DAFormer's ASPPWrapper with sep=True and pool=False: parallel branches, concat, 3x3 bottleneck."""

    def __init__(self, cin: int, channels: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1) if d == 1 else DepthwiseSeparableConvModule(cin, channels, d)
            for d in dilations
        )
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """DAFormer decoder; `forward([4 maps]) -> logits` at the first map's size (stride 4).

    `fuse(maps)` gives the fused features [B, channels, H/4, W/4] (before dropout), `classify(fused)` the logits.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...] = (64, 128, 320, 512),
        num_classes: int = 19,
        embed_dims: int = 256,
        channels: int = 256,
        dilations: tuple[int, ...] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if not in_channels or any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels must be positive channel counts, got {tuple(in_channels)}")
        if num_classes < 1 or embed_dims < 1 or channels < 1:
            raise ValueError(
                f"num_classes, embed_dims and channels must be >= 1, got {num_classes}, {embed_dims}, {channels}"
            )
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty list of positive ints, got {tuple(dilations)}")
        if not 0.0 <= dropout_ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {dropout_ratio}")
        self.in_channels = tuple(in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.embed_layers = nn.ModuleDict({str(i): MLPEmbed(c, embed_dims) for i, c in enumerate(in_channels)})
        self.fuse_layer = SepASPP(len(in_channels) * embed_dims, channels, tuple(dilations))
        # mmseg builds Dropout2d only for a positive ratio; Dropout2d(0) is the same identity and keeps one path.
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, HEAD_INIT_STD)
        nn.init.zeros_(self.conv_seg.bias)

    def fuse(self, feats: list[Tensor]) -> Tensor:
        """Embed every stage, resize to the stride-4 size, fuse: [B, channels, H/4, W/4]."""
        if len(feats) != len(self.embed_layers):
            raise ValueError(f"expected {len(self.embed_layers)} feature maps, got {len(feats)}")
        size = feats[0].shape[-2:]
        embedded = []
        for i, x in enumerate(feats):
            e = self.embed_layers[str(i)](x)
            if e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        return self.fuse_layer(torch.cat(embedded, dim=1))

    def classify(self, fused: Tensor) -> Tensor:
        """Dropout2d then the 1x1 classifier: logits at the fused map's size."""
        return self.conv_seg(self.dropout(fused))

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classify(self.fuse(feats))
