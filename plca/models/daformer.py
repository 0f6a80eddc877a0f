"""DAFormer (Hoyer et al. 2022): the MiT encoder plus the DAFormer decoder, behind the pipeline's output contract.

`forward` returns every encoder stage's map ("feature_maps", what ImageNet feature distance and PGPC's contrast
read), the fused decoder features ("features", stride 4, before the head's dropout) and the logits (stride 4).
Parameter names start with ``backbone.`` (the encoder, SegFormer's keys) and ``head.`` (the decoder), so the
optimiser's custom keys find the head by "head" and the norms by "norm" as in DAFormer's config; no encoder
parameter name contains "head".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from plca.models.daformer_head import DAFormerHead
from plca.models.mit import NUM_STAGES, MixVisionTransformer, load_mit_weights
from plca.models.output import FEATURE_MAPS, FEATURES, LOGITS, SegmentationModel


@dataclass
class DAFormerConfig:
    """Options of DAFormer (defaults: MiT-B5 and the released head)."""

    num_classes: int = 19
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4)
    depths: tuple[int, ...] = (3, 6, 40, 3)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    drop_path_rate: float = 0.1
    head_embed_dims: int = 256
    head_channels: int = 256
    dilations: tuple[int, ...] = (1, 6, 12, 18)
    dropout_ratio: float = 0.1
    pretrained: Path | None = None  # SegFormer mit_b*.pth for the encoder
    #: Bilinear upsampling of logits to label/crop size: False, as DAFormer.
    align_corners: bool = False

    def __post_init__(self) -> None:
        for name in ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios", "dilations"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios"):
            values = getattr(self, name)
            if len(values) != NUM_STAGES:
                raise ValueError(f"{name} needs one value per MiT stage ({NUM_STAGES}), got {values}")
            if any(v <= 0 for v in values):
                raise ValueError(f"{name} must be positive, got {values}")
        for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
            if dim % heads:
                raise ValueError(f"embed_dims {self.embed_dims} must be divisible by num_heads {self.num_heads}")
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations must be a non-empty list of positive ints, got {self.dilations}")
        for name in ("num_classes", "head_embed_dims", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("drop_path_rate", "dropout_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pretrained is not None:
            self.pretrained = Path(self.pretrained)


class DAFormer(SegmentationModel):
    """MiT encoder (`backbone`) + DAFormer decoder (`head`); output stride 4."""

    def __init__(self, cfg: DAFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MixVisionTransformer(
            embed_dims=cfg.embed_dims,
            num_heads=cfg.num_heads,
            mlp_ratios=cfg.mlp_ratios,
            depths=cfg.depths,
            sr_ratios=cfg.sr_ratios,
            qkv_bias=True,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.head = DAFormerHead(
            in_channels=cfg.embed_dims,
            num_classes=cfg.num_classes,
            embed_dims=cfg.head_embed_dims,
            channels=cfg.head_channels,
            dilations=cfg.dilations,
            dropout_ratio=cfg.dropout_ratio,
        )
        self.output_stride = 4
        self.feature_channels = cfg.head_channels
        self.align_corners = cfg.align_corners

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        maps = self.backbone(x)
        features = self.head.fuse(maps)
        return {FEATURE_MAPS: maps, FEATURES: features, LOGITS: self.head.classify(features)}

    def classify(self, features: Tensor) -> Tensor:
        """The head's dropout and classifier alone: logits from (possibly aggregated) fused features."""
        return self.head.classify(features)


def build_daformer(cfg: DAFormerConfig) -> DAFormer:
    """Build DAFormer; with `cfg.pretrained` set, the encoder starts from that SegFormer mit_b*.pth."""
    model = DAFormer(cfg)
    if cfg.pretrained is not None:
        load_mit_weights(model.backbone, cfg.pretrained)
    return model
