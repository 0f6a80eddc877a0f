"""SegFormer's Mix Vision Transformer (MiT, Xie et al. 2021), the DAFormer encoder, in plain torch.

Module and parameter names follow the released mix_transformer.py (NVlabs/SegFormer, as DAFormer vendors it), so a
SegFormer ``mit_b*.pth`` ImageNet state_dict loads unchanged: ``patch_embed{1-4}.proj|norm``,
``block{1-4}.{i}.norm1|attn.q|attn.kv|attn.sr|attn.norm|attn.proj|norm2|mlp.fc1|mlp.dwconv.dwconv|mlp.fc2``,
``norm{1-4}`` (``attn.sr``/``attn.norm`` only where the reduction ratio is > 1).

Stage i: overlapping patch embedding (conv 7x7 s4 p3 for the first stage, 3x3 s2 p1 after; LayerNorm eps 1e-5),
``depths[i]`` blocks ``x + DP(attn(LN x))``, ``x + DP(MixFFN(LN x))`` (LN eps 1e-6), a stage-end LayerNorm (eps 1e-6),
then the tokens back to an NCHW map: strides 4, 8, 16, 32. For a 64x128 input: 16x32, 8x16, 4x8, 2x4.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from plca.models.weights import check_fit, read_state_dict

NUM_STAGES = 4
BLOCK_LN_EPS = 1e-6  # mit_b* builds blocks and stage-end norms with partial(nn.LayerNorm, eps=1e-6)
PATCH_LN_EPS = 1e-5  # the patch embeddings' and the reduction's nn.LayerNorm keep torch's default eps
LINEAR_INIT_STD = 0.02

# SegFormer's released encoders, (embed_dims, depths) -> file name, only to name the right file in error messages.
MIT_VARIANTS: dict[tuple[tuple[int, ...], tuple[int, ...]], str] = {
    ((32, 64, 160, 256), (2, 2, 2, 2)): "mit_b0.pth",
    ((64, 128, 320, 512), (2, 2, 2, 2)): "mit_b1.pth",
    ((64, 128, 320, 512), (3, 4, 6, 3)): "mit_b2.pth",
    ((64, 128, 320, 512), (3, 4, 18, 3)): "mit_b3.pth",
    ((64, 128, 320, 512), (3, 8, 27, 3)): "mit_b4.pth",
    ((64, 128, 320, 512), (3, 6, 40, 3)): "mit_b5.pth",
}


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's drop_path): in training each sample's residual branch is zeroed with
    probability `drop_prob` and the kept ones are scaled by 1 / (1 - drop_prob); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def _to_map(x: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, h*w, C] -> map [B, C, h, w]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class OverlapPatchEmbed(nn.Module):
    """Conv with overlapping windows (padding k // 2), then LayerNorm on the tokens."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=PATCH_LN_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Efficient self-attention: queries from every token, keys and values from the map shrunk by a conv with
    kernel = stride = `sr_ratio` (+ LayerNorm) when `sr_ratio` > 1."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=PATCH_LN_EPS)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        d = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, d).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(_to_map(x, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)
        # Written out as released (no fused kernel) so the result and its gradients are deterministic.
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depthwise conv (with bias) on the token map; the extra level keeps SegFormer's ``mlp.dwconv.dwconv``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.dwconv(_to_map(x, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear(d, hidden) -> depthwise 3x3 conv -> GELU -> Linear(hidden, d) (dropout 0, as released)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, sr_ratio: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, sr_ratio)
        # Kept as a DropPath even at rate 0 (SegFormer uses an Identity there: same output, no parameters).
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """MiT encoder; `forward(x) -> [4 NCHW maps]` at strides 4, 8, 16, 32 with `embed_dims` channels.

    Defaults are MiT-B5 (DAFormer's encoder). DropPath rates rise linearly from 0 to `drop_path_rate` over all
    blocks (`drop_path_rates`).
    """

    def __init__(
        self,
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (4, 4, 4, 4),
        depths: tuple[int, ...] = (3, 6, 40, 3),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        per_stage = {
            "embed_dims": embed_dims,
            "num_heads": num_heads,
            "mlp_ratios": mlp_ratios,
            "depths": depths,
            "sr_ratios": sr_ratios,
        }
        for name, values in per_stage.items():
            if len(values) != NUM_STAGES:
                raise ValueError(f"{name} needs one value per stage ({NUM_STAGES}), got {tuple(values)}")
            if any(v <= 0 for v in values):
                raise ValueError(f"{name} must be positive, got {tuple(values)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_stages = NUM_STAGES
        self.drop_path_rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]

        # Registered in SegFormer's order (patch_embed1-4, then block1, norm1, block2, ...): parameters() and
        # state_dict() list them as the released model does.
        for i in range(NUM_STAGES):
            first = i == 0
            embed = OverlapPatchEmbed(
                7 if first else 3, 4 if first else 2, in_chans if first else embed_dims[i - 1], embed_dims[i]
            )
            setattr(self, f"patch_embed{i + 1}", embed)
        cur = 0
        for i in range(NUM_STAGES):
            blocks = nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, self.drop_path_rates[cur + j], sr_ratios[i])
                for j in range(depths[i])
            )
            cur += depths[i]
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=BLOCK_LN_EPS))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # SegFormer's _init_weights: truncated normal Linear, identity LayerNorm, He-normal conv on fan_out.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=LINEAR_INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, NUM_STAGES + 1):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = _to_map(getattr(self, f"norm{i}")(x), h, w).contiguous()
            outs.append(x)
        return outs


def _needed(encoder: MixVisionTransformer) -> str:
    name = MIT_VARIANTS.get((encoder.embed_dims, encoder.depths), "mit_b*.pth")
    return (
        f"a SegFormer ImageNet state_dict for MiT with widths {encoder.embed_dims} and depths {encoder.depths} "
        f"(SegFormer's {name}); expected SegFormer's mit_b* layout: patch_embed1.proj.weight, "
        "patch_embed1.norm.weight, ..., block1.0.norm1.weight, block1.0.attn.q.weight, block1.0.attn.kv.weight, "
        "block1.0.attn.sr.weight, ..., block1.0.mlp.dwconv.dwconv.weight, ..., norm4.weight"
    )


def load_mit_weights(encoder: MixVisionTransformer, path: Path | str) -> list[str]:
    """Load a SegFormer ``mit_b*.pth`` state_dict into `encoder`; return the file's keys that were ignored.

    Only an ImageNet classifier ``head.*`` is dropped; every encoder key is required, with the encoder's shape, and
    no other key is accepted, else WeightsError lists what differs.
    """
    path = Path(path)
    state = read_state_dict(path, "MiT ImageNet weights", _needed(encoder))

    expected = encoder.state_dict()
    ignored = sorted(k for k in state if k.startswith("head."))
    kept = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_fit(path, expected, kept,
              f"does not fit MiT with widths {encoder.embed_dims} and depths {encoder.depths}", _needed(encoder))
    encoder.load_state_dict(kept, strict=True)
    return ignored
