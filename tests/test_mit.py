"""MiT encoder, DAFormer head and model, teacher mode and SegFormer weight loading, on the toy config."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from plca.models import (
    FEATURE_MAPS,
    FEATURES,
    LOGITS,
    DAFormer,
    DAFormerConfig,
    DAFormerHead,
    MixVisionTransformer,
    WeightsError,
    build_daformer,
    load_mit_weights,
    teacher_mode_,
)
from plca.models.mit import DropPath

TOY_DIMS = (32, 64, 160, 256)
TOY_DEPTHS = (2, 2, 2, 2)


def toy_encoder(seed: int = 0, **kwargs) -> MixVisionTransformer:
    torch.manual_seed(seed)
    return MixVisionTransformer(embed_dims=TOY_DIMS, depths=TOY_DEPTHS, **kwargs)


def toy_config(**kwargs) -> DAFormerConfig:
    base = dict(num_classes=5, embed_dims=TOY_DIMS, depths=TOY_DEPTHS, head_embed_dims=64, head_channels=64)
    return DAFormerConfig(**{**base, **kwargs})


def expected_mit_keys(depths: tuple[int, ...], sr_ratios: tuple[int, ...] = (8, 4, 2, 1)) -> set[str]:
    keys = set()
    for s in range(1, 5):
        for m in ("proj", "norm"):
            keys |= {f"patch_embed{s}.{m}.weight", f"patch_embed{s}.{m}.bias"}
        keys |= {f"norm{s}.weight", f"norm{s}.bias"}
        for i in range(depths[s - 1]):
            mods = ["norm1", "attn.q", "attn.kv", "attn.proj", "norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            if sr_ratios[s - 1] > 1:
                mods += ["attn.sr", "attn.norm"]
            keys |= {f"block{s}.{i}.{m}.{p}" for m in mods for p in ("weight", "bias")}
    return keys


def test_mit_state_dict_keys_and_shapes():
    enc = toy_encoder()
    sd = enc.state_dict()
    assert set(sd) == expected_mit_keys(TOY_DEPTHS)
    b5 = MixVisionTransformer(depths=(2, 2, 2, 2)).state_dict()  # B5 widths, shortened
    assert set(b5) == expected_mit_keys((2, 2, 2, 2))
    assert b5["block1.0.attn.kv.weight"].shape == (128, 64)
    assert b5["block1.0.attn.q.weight"].shape == (64, 64)
    assert b5["patch_embed1.proj.weight"].shape == (64, 3, 7, 7)
    assert b5["patch_embed2.proj.weight"].shape == (128, 64, 3, 3)
    assert b5["block1.0.attn.sr.weight"].shape == (64, 64, 8, 8)
    assert b5["block3.1.attn.sr.weight"].shape == (320, 320, 2, 2)
    assert "block4.0.attn.sr.weight" not in b5 and "block4.0.attn.norm.weight" not in b5
    assert b5["block2.1.mlp.fc1.weight"].shape == (512, 128)
    assert b5["block2.1.mlp.dwconv.dwconv.weight"].shape == (512, 1, 3, 3)
    assert b5["block2.1.mlp.dwconv.dwconv.bias"].shape == (512,)
    assert b5["norm4.weight"].shape == (512,)


def test_mit_layer_settings():
    enc = MixVisionTransformer(depths=(1, 1, 1, 1))
    pe1, pe2 = enc.patch_embed1.proj, enc.patch_embed2.proj
    assert (pe1.kernel_size, pe1.stride, pe1.padding) == ((7, 7), (4, 4), (3, 3))
    assert (pe2.kernel_size, pe2.stride, pe2.padding) == ((3, 3), (2, 2), (1, 1))
    assert enc.patch_embed1.norm.eps == 1e-5 and enc.block1[0].attn.norm.eps == 1e-5
    assert enc.block1[0].norm1.eps == 1e-6 and enc.block1[0].norm2.eps == 1e-6 and enc.norm1.eps == 1e-6
    assert enc.block1[0].attn.sr.kernel_size == (8, 8) and enc.block1[0].attn.sr.stride == (8, 8)
    assert enc.block3[0].attn.scale == pytest.approx((320 / 5) ** -0.5)
    assert enc.block2[0].mlp.dwconv.dwconv.groups == 512
    assert enc.block1[0].attn.q.bias is not None  # qkv_bias
    assert not any("head" in name for name, _ in enc.named_parameters())


def test_mit_init():
    enc = MixVisionTransformer(depths=(1, 1, 1, 1))
    fc1 = enc.block3[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(fc1.bias == 0)
    dw = enc.block3[0].mlp.dwconv.dwconv  # groups = channels: fan_out = 9
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    sr = enc.block1[0].attn.sr  # fan_out = 8 * 8 * 64
    assert sr.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 64)), rel=0.05)
    assert torch.all(enc.norm2.weight == 1) and torch.all(enc.norm2.bias == 0)
    assert torch.equal(toy_encoder(3).block1[0].attn.q.weight, toy_encoder(3).block1[0].attn.q.weight)


def test_mit_output_shapes():
    enc = toy_encoder().eval()
    outs = enc(torch.randn(2, 3, 64, 128))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 32), (2, 64, 8, 16), (2, 160, 4, 8), (2, 256, 2, 4)]


def test_drop_path_rates_linspace():
    enc = toy_encoder(drop_path_rate=0.1)
    rates = [blk.drop_path.drop_prob for s in range(1, 5) for blk in getattr(enc, f"block{s}")]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])
    b5 = MixVisionTransformer(depths=(3, 6, 40, 3))
    assert len(b5.drop_path_rates) == 52 and b5.drop_path_rates[-1] == pytest.approx(0.1)
    assert b5.block3[0].drop_path.drop_prob == pytest.approx(0.1 * 9 / 51)


def test_drop_path_per_sample():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    torch.manual_seed(0)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # whole sample kept or dropped
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(dp.eval()(x), x)


HEAD_KEYS = (
    [f"embed_layers.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")]
    + ["fuse_layer.aspp_modules.0.conv.weight"]
    + [f"fuse_layer.aspp_modules.{j}.{m}.conv.weight" for j in (1, 2, 3) for m in ("depthwise_conv", "pointwise_conv")]
    + ["fuse_layer.bottleneck.conv.weight", "conv_seg.weight", "conv_seg.bias"]
)
BN_PREFIXES = (
    ["fuse_layer.aspp_modules.0.bn"]
    + [f"fuse_layer.aspp_modules.{j}.{m}.bn" for j in (1, 2, 3) for m in ("depthwise_conv", "pointwise_conv")]
    + ["fuse_layer.bottleneck.bn"]
)
BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_head_keys_shapes_and_init():
    torch.manual_seed(0)
    head = DAFormerHead()
    sd = head.state_dict()
    assert set(sd) == set(HEAD_KEYS) | {f"{p}.{leaf}" for p in BN_PREFIXES for leaf in BN_LEAVES}
    assert sd["embed_layers.2.proj.weight"].shape == (256, 320)
    assert sd["fuse_layer.aspp_modules.0.conv.weight"].shape == (256, 1024, 1, 1)
    assert sd["fuse_layer.aspp_modules.2.depthwise_conv.conv.weight"].shape == (1024, 1, 3, 3)
    assert sd["fuse_layer.aspp_modules.2.pointwise_conv.conv.weight"].shape == (256, 1024, 1, 1)
    assert sd["fuse_layer.bottleneck.conv.weight"].shape == (256, 1024, 3, 3)
    assert sd["conv_seg.weight"].shape == (19, 256, 1, 1)
    dw = head.fuse_layer.aspp_modules[3].depthwise_conv.conv
    assert (dw.dilation, dw.padding, dw.groups) == ((18, 18), (18, 18), 1024)
    assert all(m.bias is None for m in head.fuse_layer.modules() if isinstance(m, nn.Conv2d))
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(head.conv_seg.bias == 0)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1


def test_head_fuse_and_classify():
    enc = toy_encoder().eval()
    torch.manual_seed(1)
    head = DAFormerHead(TOY_DIMS, num_classes=5, embed_dims=64, channels=64).eval()
    maps = enc(torch.randn(2, 3, 64, 128))
    fused = head.fuse(maps)
    assert fused.shape == (2, 64, 16, 32)
    logits = head(maps)
    assert logits.shape == (2, 5, 16, 32)
    assert torch.allclose(logits, head.classify(fused))


def test_daformer_outputs_and_names():
    torch.manual_seed(0)
    model = build_daformer(toy_config()).eval()
    assert isinstance(model, DAFormer)
    assert model.output_stride == 4 and model.feature_channels == 64 and model.align_corners is False
    out = model(torch.randn(2, 3, 64, 128))
    assert [tuple(m.shape) for m in out[FEATURE_MAPS]] == [
        (2, 32, 16, 32),
        (2, 64, 8, 16),
        (2, 160, 4, 8),
        (2, 256, 2, 4),
    ]
    assert out[FEATURES].shape == (2, 64, 16, 32) and out[LOGITS].shape == (2, 5, 16, 32)
    assert torch.allclose(model.classify(out[FEATURES]), out[LOGITS])
    assert model.upsample(out[LOGITS], (64, 128)).shape == (2, 5, 64, 128)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "head.")) for n in names)
    assert not any("head" in n for n in names if n.startswith("backbone."))


def test_daformer_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = DAFormer(toy_config(drop_path_rate=0.0, dropout_ratio=0.0)).train()
    model(torch.randn(2, 3, 64, 128))[LOGITS].square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_validation_and_conversion(tmp_path):
    cfg = DAFormerConfig(embed_dims=[32, 64, 160, 256], depths=[2, 2, 2, 2], pretrained=str(tmp_path / "w.pth"))
    assert cfg.embed_dims == TOY_DIMS and cfg.depths == TOY_DEPTHS and cfg.pretrained == tmp_path / "w.pth"
    with pytest.raises(ValueError, match="depths"):
        DAFormerConfig(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        DAFormerConfig(embed_dims=(32, 64, 160, 250))
    with pytest.raises(ValueError, match="positive"):
        DAFormerConfig(sr_ratios=(8, 4, 0, 1))
    with pytest.raises(ValueError, match="dropout_ratio"):
        DAFormerConfig(dropout_ratio=1.0)


def test_teacher_mode_turns_off_dropout_and_drop_path():
    torch.manual_seed(0)
    model = DAFormer(toy_config(drop_path_rate=0.1, dropout_ratio=0.1))
    x = torch.randn(2, 3, 64, 128)
    model.train()
    with torch.no_grad():
        a, b = model(x)[LOGITS], model(x)[LOGITS]
    assert not torch.allclose(a, b)  # the student is stochastic
    assert teacher_mode_(model) is model
    assert model.training and model.head.fuse_layer.bottleneck.bn.training  # BN on the batch's statistics
    assert not model.head.dropout.training and not model.backbone.block4[1].drop_path.training
    with torch.no_grad():
        a, b = model(x)[LOGITS], model(x)[LOGITS]
    assert torch.equal(a, b)
    with torch.no_grad():
        evaluated = model.eval()(x)[LOGITS]
    assert not torch.allclose(a, evaluated)  # teacher mode is not eval mode: BN used the batch statistics


def test_load_mit_weights_round_trip(tmp_path):
    src = toy_encoder(seed=0)
    state = dict(src.state_dict())
    state["head.weight"] = torch.zeros(1000, 256)
    state["head.bias"] = torch.zeros(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    dst = toy_encoder(seed=1)
    assert not torch.equal(dst.block1[0].attn.q.weight, src.block1[0].attn.q.weight)
    assert load_mit_weights(dst, path) == ["head.bias", "head.weight"]
    for (name, p), q in zip(dst.state_dict().items(), src.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    torch.manual_seed(2)
    model = build_daformer(toy_config(pretrained=path))
    assert torch.equal(model.backbone.norm4.weight, src.norm4.weight)


def _save(tmp_path, state, name="w.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_load_mit_weights_errors(tmp_path):
    enc = toy_encoder()
    good = enc.state_dict()

    missing = {k: v for k, v in good.items() if k != "block2.1.attn.kv.weight"}
    with pytest.raises(WeightsError, match="missing") as err:
        load_mit_weights(enc, _save(tmp_path, missing, "missing.pth"))
    assert "missing.pth" in str(err.value) and "block2.1.attn.kv.weight" in str(err.value)
    assert "patch_embed1.proj.weight" in str(err.value)  # the expected layout is spelled out

    unexpected = {**good, "decode_head.conv_seg.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match="unexpected keys.*decode_head.conv_seg.weight"):
        load_mit_weights(enc, _save(tmp_path, unexpected))

    mismatched = {**good, "block1.0.attn.kv.weight": torch.zeros(32, 32)}
    with pytest.raises(WeightsError, match=r"shape mismatches.*block1.0.attn.kv.weight file \(32, 32\)"):
        load_mit_weights(enc, _save(tmp_path, mismatched))

    b1 = MixVisionTransformer(depths=(2, 2, 2, 2)).state_dict()  # the wrong variant
    with pytest.raises(WeightsError, match="mit_b0.pth"):
        load_mit_weights(enc, _save(tmp_path, b1))

    absent = tmp_path / "nope" / "mit_b5.pth"
    with pytest.raises(FileNotFoundError, match=str(absent.resolve())):
        load_mit_weights(enc, absent)

    with pytest.raises(WeightsError, match="flat mapping.*'state_dict'"):
        load_mit_weights(enc, _save(tmp_path, {"state_dict": good, "meta": {}}))

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pth: not a readable"):
        load_mit_weights(enc, junk)
    # Nothing was loaded by the failed attempts.
    assert torch.equal(enc.block2[1].attn.kv.weight, good["block2.1.attn.kv.weight"])
