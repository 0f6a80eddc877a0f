"""DeepLab-v2 (Chen et al. 2017): dilated ResNet at output stride 8 plus the ASPP classifier.

The ASPP of DeepLab-v2 is one 3x3 conv per rate, each mapping the last backbone features straight to class
scores; the branches are summed. `forward` returns the output dict of `plca.models.output`: the features and the
logits (both at 1/8 of the input), because PLCA associates features; `classify` runs the head alone for test-time
feature aggregation. With `aux_head` a second ASPP (same rates) on layer3's output adds "aux_logits", the
auxiliary level of AdaptSegNet's and ADVENT's multi-level training (weight 0.1 in their segmentation loss).

BatchNorm modes (`bn_mode`, for `norm: batch`): "train" (statistics and affine trained, the released PLCA code);
"frozen_affine" (affine not optimised, statistics of the batch in train mode: AdaptSegNet, ADVENT); "eval"
(BatchNorm layers stay in eval mode during training: running statistics used and kept); "frozen" (both: eval
mode and affine not optimised, the released CRST, whose DeepLab-ResNet sets requires_grad False on BatchNorm and
trains in model.eval()).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from plca.models.output import AUX_LOGITS, FEATURES, LOGITS, SegmentationModel
from plca.models.resnet import Norm, ResNet, load_imagenet_weights

BNMode = Literal["train", "frozen_affine", "eval", "frozen"]

HEAD_INIT_STD = 0.01  # DeepLab-v2's Gaussian init of the classifier weights (biases start at 0)


@dataclass
class DeepLabV2Config:
    """Options of the segmentation network (the `model` section of params.yaml)."""

    num_classes: int = 19
    depth: int = 101
    width: float = 1.0
    norm: Norm = "batch"
    groups: int = 32  # GroupNorm groups; must divide every channel count (e.g. 8 at width 0.25)
    aspp_rates: tuple[int, ...] = (6, 12, 18, 24)
    pretrained: Path | None = None  # torchvision ImageNet state_dict for the backbone
    #: How BatchNorm layers train (see the module docstring); no effect on other norms.
    bn_mode: BNMode = "train"
    #: Bilinear upsampling of logits to label/crop size: False as torch and the released PLCA code.
    align_corners: bool = False
    #: A second ASPP head on layer3 whose logits the forward adds as "aux_logits" (multi-level AdaptSegNet,
    #: ADVENT, IntraDA). Off: the model, its state_dict and its outputs are those without the option.
    aux_head: bool = False

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.aspp_rates or any(r < 1 for r in self.aspp_rates):
            raise ValueError(f"aspp_rates must be a non-empty list of positive dilations, got {self.aspp_rates}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        self.aspp_rates = tuple(self.aspp_rates)
        if self.pretrained is not None:
            self.pretrained = Path(self.pretrained)


class ASPPClassifier(nn.Module):
    """Sum of parallel dilated 3x3 convs, features -> class logits.

    Weights N(0, 0.01); biases 0 (`zero_bias`, DeepLab-v2's init, our main head) or torch's default uniform
    (the released AdaptSegNet / ADVENT heads). Either way the random draws are the same (torch draws the default
    bias at construction), so the option does not shift the initialisation of anything built after the head.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...], zero_bias: bool = True) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=HEAD_INIT_STD)
            if zero_bias:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(SegmentationModel):
    """Backbone + ASPP. `forward(x) -> {"features", "logits"}`, both at output stride 8, plus "aux_logits" (same
    size) with `cfg.aux_head`."""

    def __init__(self, cfg: DeepLabV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(cfg.depth, cfg.width, cfg.norm, cfg.groups)
        self.classifier = ASPPClassifier(self.backbone.out_channels, cfg.num_classes, cfg.aspp_rates)
        if cfg.aux_head:
            # Built after the main head, so backbone and main head start as without the option (same seed). Its
            # biases keep torch's default init, as the released multi-level codes' heads (the spec's released
            # behaviour); the main head keeps DeepLab-v2's zero biases. Outside `backbone.`: the head's lr.
            self.aux_classifier = ASPPClassifier(
                self.backbone.layer3_channels, cfg.num_classes, cfg.aspp_rates, zero_bias=False
            )
        self.feature_channels = self.backbone.out_channels
        self.output_stride = self.backbone.output_stride
        self.align_corners = cfg.align_corners
        if cfg.bn_mode in ("frozen_affine", "frozen"):
            for m in self._batch_norms():
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def _batch_norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if mode and self.cfg.bn_mode in ("eval", "frozen"):
            for m in self._batch_norms():
                m.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not self.cfg.aux_head:
            features = self.backbone(x)
            return {FEATURES: features, LOGITS: self.classifier(features)}
        layer3, features = self.backbone.last_two_stages(x)
        return {FEATURES: features, LOGITS: self.classifier(features), AUX_LOGITS: self.aux_classifier(layer3)}

    def classify(self, features: Tensor) -> Tensor:
        """The ASPP head alone: logits from (possibly aggregated) features."""
        return self.classifier(features)


def build_model(cfg: DeepLabV2Config) -> DeepLabV2:
    """Build DeepLab-v2; with `cfg.pretrained` set, the backbone starts from those ImageNet weights."""
    model = DeepLabV2(cfg)
    if cfg.pretrained is not None:
        load_imagenet_weights(model.backbone, cfg.pretrained)
    return model
