"""ResNet backbone at output stride 8 for DeepLab-v2, in plain torch.

Parameter and buffer names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...; no ``fc``) so an ImageNet state_dict saved by torchvision loads unchanged.
Like torchvision (v1.5), a Bottleneck puts its stride on the 3x3 conv.

Output stride 8 follows torchvision's ``replace_stride_with_dilation=[False, True, True]``: layer3 and layer4 keep
stride 1 and use dilation 2 and 4; the first block of a dilated layer still uses the previous layer's dilation.

Spatial size of the features: stem conv (k7, s2, p3) -> maxpool (k3, s2, p1) -> layer2 (s2), each
``floor((n + 2p - k) / s) + 1``. For 730: 365 -> 183 -> 92 (the paper's 92x92). Caffe's ceil-mode pooling gives the
same 183 for 365, so both conventions agree there. For 64x128: 32x64 -> 16x32 -> 8x16.

Torchvision ImageNet weights expect RGB in [0, 1] normalised by the ImageNet mean/std (not Caffe's BGR 0-255).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from plca.models.weights import check_fit, read_state_dict

Norm = Literal["batch", "group", "frozen_batch"]

# Blocks per stage, as in He et al. 2016 (Table 1).
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
BASE_WIDTH = 64  # stem and first-stage width of a standard ResNet; stages double it
BN_EPS = 1e-5  # torchvision's BatchNorm eps, so ImageNet weights behave as trained
# File names torchvision publishes its ImageNet ResNet weights under (IMAGENET1K_V1), quoted in error messages.
TORCHVISION_FILES = {
    18: "resnet18-f37072fd.pth",
    34: "resnet34-b627a593.pth",
    50: "resnet50-0676ba61.pth",
    101: "resnet101-63fe2227.pth",
}
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers (as torchvision's)."""

    def __init__(self, num_features: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A BatchNorm checkpoint carries a counter this layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def make_norm(norm: Norm, groups: int) -> Callable[[int], nn.Module]:
    """A factory `channels -> normalisation layer` for the chosen norm."""
    if norm == "batch":
        return lambda c: nn.BatchNorm2d(c, eps=BN_EPS)
    if norm == "frozen_batch":
        return lambda c: FrozenBatchNorm2d(c)
    if norm == "group":

        def group_norm(c: int) -> nn.Module:
            if c % groups:
                raise ValueError(f"GroupNorm: {groups} groups cannot split {c} channels; choose groups dividing {c}")
            return nn.GroupNorm(groups, c)

        return group_norm
    raise ValueError(f"unknown norm {norm!r}; expected 'batch', 'group' or 'frozen_batch'")


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        dilation: int,
        norm: Callable[[int], nn.Module],
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride, dilation)
        self.bn1 = norm(width)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        dilation: int,
        norm: Callable[[int], nn.Module],
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = norm(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = norm(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = norm(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 without pooling head, output stride 8.

    `width` scales every stage (stem and stage widths round(64 * width * 2**i)); `norm` picks BatchNorm,
    GroupNorm (`groups` groups; no running statistics, so target images cannot shift them) or frozen BatchNorm.
    """

    def __init__(self, depth: int = 101, width: float = 1.0, norm: Norm = "batch", groups: int = 32) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(STAGE_BLOCKS)}")
        if not width > 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        stem = round(BASE_WIDTH * width)
        if stem < 1:
            raise ValueError(f"width multiplier {width} leaves no channels in the stem")
        self.depth = depth
        self.width = width
        self.norm = norm
        block = BasicBlock if depth < 50 else Bottleneck
        norm_layer = make_norm(norm, groups)

        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self._cin = stem
        self._dilation = 1
        blocks = STAGE_BLOCKS[depth]
        widths = [round(BASE_WIDTH * width * 2**i) for i in range(4)]
        self.layer1 = self._make_layer(block, widths[0], blocks[0], 1, False, norm_layer)
        self.layer2 = self._make_layer(block, widths[1], blocks[1], 2, False, norm_layer)
        self.layer3 = self._make_layer(block, widths[2], blocks[2], 2, True, norm_layer)
        self.layer4 = self._make_layer(block, widths[3], blocks[3], 2, True, norm_layer)
        self.out_channels = widths[3] * block.expansion
        self.layer3_channels = widths[2] * block.expansion  # what `last_two_stages` returns first (1024 at R101)
        self.output_stride = 8
        self._init_weights()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        width: int,
        n: int,
        stride: int,
        dilate: bool,
        norm: Callable[[int], nn.Module],
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            # Trade the stride for dilation so the resolution stays at 1/8.
            self._dilation *= stride
            stride = 1
        cout = width * block.expansion
        downsample = None
        if stride != 1 or self._cin != cout:
            downsample = nn.Sequential(_conv1x1(self._cin, cout, stride), norm(cout))
        layers = [block(self._cin, width, stride, previous_dilation, norm, downsample)]
        self._cin = cout
        layers += [block(cout, width, 1, self._dilation, norm, None) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init for convs (fan_out, as torchvision), identity affine for norms.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def last_two_stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(layer3's output, layer4's output), both at output stride 8: the auxiliary head of the multi-level
        DeepLab-v2 methods reads the first, everything else the second (what `forward` returns)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        c3 = self.layer3(x)
        return c3, self.layer4(c3)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_two_stages(x)[1]


def _needed(backbone: ResNet) -> str:
    example = TORCHVISION_FILES.get(backbone.depth, "")
    return (
        f"a torchvision ResNet-{backbone.depth} ImageNet state_dict (.pth, e.g. torchvision's {example}), "
        "keys conv1.weight, bn1.weight, layer1.0.conv1.weight, ..."
    )


def load_imagenet_weights(backbone: ResNet, path: Path | str) -> list[str]:
    """Load a torchvision-layout ImageNet state_dict into `backbone`; return the file's keys that were ignored.

    `fc.*` is dropped. Everything else must match exactly (names and shapes), else WeightsError lists what differs.
    With GroupNorm the file's BatchNorm running statistics do not apply and are ignored; its affine parameters
    (bn*.weight/bias) and all convolutions are loaded, as an initialisation. With frozen BatchNorm the
    ``num_batches_tracked`` counters are ignored.
    """
    path = Path(path)
    state = read_state_dict(path, "ImageNet weights", _needed(backbone))

    expected = backbone.state_dict()
    modules = dict(backbone.named_modules())
    ignored = {k for k in state if k.startswith("fc.")}
    for key in state:
        owner, _, leaf = key.rpartition(".")
        # Statistics the model's norm layers do not keep (GroupNorm: none; frozen BN: no counter).
        stateless = isinstance(modules.get(owner), nn.GroupNorm | FrozenBatchNorm2d)
        if leaf in _RUNNING_STATS and key not in expected and stateless:
            ignored.add(key)
    kept = {k: v for k, v in state.items() if k not in ignored}

    check_fit(path, expected, kept,
              f"does not fit ResNet-{backbone.depth} width {backbone.width} norm {backbone.norm}",
              f"{_needed(backbone)}; ImageNet weights exist only for width 1.0")
    backbone.load_state_dict(kept, strict=True)
    return sorted(ignored)
