import pytest
import torch
from torch import nn

from plca.config import ConfigError, from_dict
from plca.models import (
    DeepLabV2,
    DeepLabV2Config,
    FrozenBatchNorm2d,
    ResNet,
    WeightsError,
    build_model,
    load_imagenet_weights,
)
from plca.models.output import FEATURES, LOGITS


def fl(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of a model's output dict."""
    return out[FEATURES], out[LOGITS]


TOY = DeepLabV2Config(depth=18, width=0.25, norm="group", groups=8)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _save_with_fc(backbone: ResNet, path, num_fc_out: int = 10) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    state["fc.weight"] = torch.randn(num_fc_out, backbone.out_channels)
    state["fc.bias"] = torch.randn(num_fc_out)
    torch.save(state, path)
    return state


@pytest.mark.parametrize(
    ("depth", "channels"),
    [(18, 64), (34, 64), (50, 256), (101, 256)],
)
def test_features_and_logits_at_output_stride_8(depth: int, channels: int) -> None:
    model = DeepLabV2(DeepLabV2Config(num_classes=5, depth=depth, width=0.125, norm="batch")).eval()
    with torch.no_grad():
        features, logits = fl(model(torch.randn(1, 3, 64, 96)))
    assert features.shape == (1, channels, 8, 12)
    assert logits.shape == (1, 5, 8, 12)
    assert model.feature_channels == channels


def test_toy_default_shapes() -> None:
    features, logits = fl(DeepLabV2(TOY)(torch.randn(2, 3, 64, 128)))
    assert features.shape == (2, 128, 8, 16)
    assert logits.shape == (2, 19, 8, 16)


def test_paper_crop_gives_92x92() -> None:
    # 730 -> stem conv s2 -> 365 -> maxpool s2 -> 183 -> layer2 s2 -> 92; meta tensors: shapes without compute.
    with torch.device("meta"):
        model = DeepLabV2(DeepLabV2Config())
        features, logits = fl(model(torch.empty(1, 3, 730, 730)))
    assert features.shape == (1, 2048, 92, 92)
    assert logits.shape == (1, 19, 92, 92)


def test_dilation_schedule_follows_torchvision() -> None:
    with torch.device("meta"):
        net = ResNet(101)
    assert net.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3 conv (torchvision v1.5)
    assert net.layer3[0].conv2.dilation == (1, 1)  # first dilated block keeps the previous dilation
    assert net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.dilation == (2, 2)
    assert net.layer4[2].conv2.dilation == (4, 4)
    for layer in (net.layer3, net.layer4):
        assert all(m.stride == (1, 1) for m in layer.modules() if isinstance(m, nn.Conv2d))


def test_key_layout_matches_torchvision() -> None:
    with torch.device("meta"):
        r18, r101 = ResNet(18), ResNet(101)
    keys18 = list(r18.state_dict())
    # torchvision's resnet18 state_dict has 122 keys; 2 of them are fc.weight and fc.bias.
    assert len(keys18) == 120
    assert keys18[:7] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
    ]
    for key in ("layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias"):
        assert key in keys18
    assert "layer1.0.downsample.0.weight" not in keys18  # BasicBlock layer1 keeps 64 channels
    assert not any(k.startswith("fc.") for k in keys18)
    keys101 = set(r101.state_dict())
    assert len(keys101) == 624  # torchvision resnet101: 626 with fc
    assert {"layer1.0.downsample.0.weight", "layer3.22.conv3.weight", "layer4.2.bn3.running_mean"} <= keys101
    assert "layer3.23.conv1.weight" not in keys101


def test_parameter_counts_match_torchvision() -> None:
    # torchvision: resnet18 11,689,512 and resnet101 44,549,160 parameters, fc (512/2048 -> 1000) included.
    with torch.device("meta"):
        assert _n_params(ResNet(18)) == 11_689_512 - (512 * 1000 + 1000)
        assert _n_params(ResNet(101)) == 44_549_160 - (2048 * 1000 + 1000)
        head = DeepLabV2(DeepLabV2Config()).classifier
    assert _n_params(head) == 4 * (2048 * 19 * 9 + 19)


def test_load_round_trip_drops_fc(tmp_path) -> None:
    source = ResNet(18, width=0.25)
    with torch.no_grad():
        for buf in source.buffers():
            buf.add_(torch.rand_like(buf.float()).to(buf.dtype) + 1)
    path = tmp_path / "resnet18.pth"
    saved = _save_with_fc(source, path)
    target = ResNet(18, width=0.25)
    ignored = load_imagenet_weights(target, path)
    assert ignored == ["fc.bias", "fc.weight"]
    loaded = target.state_dict()
    assert set(loaded) == set(saved) - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_group_norm_loads_convs_and_affine_ignores_running_stats(tmp_path) -> None:
    path = tmp_path / "w.pth"
    saved = _save_with_fc(ResNet(18, width=0.25, norm="batch"), path)
    model = ResNet(18, width=0.25, norm="group", groups=8)
    ignored = load_imagenet_weights(model, path)
    assert "bn1.running_mean" in ignored and "layer2.0.downsample.1.running_var" in ignored
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert torch.equal(model.layer3[1].bn2.weight, saved["layer3.1.bn2.weight"])


def test_frozen_batch_norm_loads_stats_and_matches_eval_batch_norm(tmp_path) -> None:
    source = ResNet(18, width=0.25, norm="batch")
    with torch.no_grad():  # non-trivial statistics so the comparison means something
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "w.pth"
    _save_with_fc(source, path)
    frozen = ResNet(18, width=0.25, norm="frozen_batch")
    ignored = load_imagenet_weights(frozen, path)
    assert "bn1.num_batches_tracked" in ignored
    assert isinstance(frozen.bn1, FrozenBatchNorm2d)
    assert not any("bn" in name for name, _ in frozen.named_parameters())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(x), source.eval()(x))


def test_missing_file_says_what_is_needed(tmp_path) -> None:
    path = tmp_path / "nowhere" / "resnet101.pth"
    with torch.device("meta"):
        net = ResNet(101)
    with pytest.raises(FileNotFoundError) as err:
        load_imagenet_weights(net, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "torchvision ResNet-101 ImageNet state_dict" in msg
    assert "conv1.weight" in msg and "layer1.0.conv1.weight" in msg


def test_width_mismatch_lists_shapes_and_file(tmp_path) -> None:
    path = tmp_path / "r18_w025.pth"
    _save_with_fc(ResNet(18, width=0.25), path)
    with pytest.raises(WeightsError) as err:
        load_imagenet_weights(ResNet(18, width=0.5), path)
    msg = str(err.value)
    assert str(path) in msg
    # 20 convs and 20 BatchNorms x 4 tensors differ; only the 20 num_batches_tracked counters match.
    assert "shape mismatches (100)" in msg
    assert "conv1.weight file (16, 3, 7, 7) vs model (32, 3, 7, 7)" in msg
    assert "width 1.0" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path) -> None:
    state = ResNet(18, width=0.25).state_dict()
    del state["layer4.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_imagenet_weights(ResNet(18, width=0.25), path)
    msg = str(err.value)
    assert "missing keys (1): layer4.1.conv2.weight" in msg
    assert "unexpected keys (1): layer5.0.conv1.weight" in msg


def test_wrapped_checkpoint_gets_a_hint(tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": ResNet(18, width=0.25).state_dict(), "epoch": 3}, path)
    with pytest.raises(WeightsError, match="save its 'state_dict' entry"):
        load_imagenet_weights(ResNet(18, width=0.25), path)


def test_gradients_reach_the_stem() -> None:
    model = DeepLabV2(TOY)
    features, logits = fl(model(torch.randn(2, 3, 64, 64)))
    (logits.square().mean() + features.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_group_norm_has_no_running_statistics() -> None:
    model = DeepLabV2(TOY)
    assert list(model.buffers()) == []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = model.train()(x)[LOGITS]
        eval_out = model.eval()(x)[LOGITS]
    torch.testing.assert_close(train_out, eval_out)  # seeing images changes nothing in train mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_group_norm_groups_must_divide_channels() -> None:
    with pytest.raises(ValueError, match="32 groups cannot split 16 channels"):
        DeepLabV2(DeepLabV2Config(depth=18, width=0.25, norm="group", groups=32))


def test_classify_equals_forward_logits_and_head_init() -> None:
    model = DeepLabV2(TOY).eval()
    with torch.no_grad():
        features, logits = fl(model(torch.randn(1, 3, 64, 64)))
        torch.testing.assert_close(model.classify(features), logits)
    for conv in model.classifier.branches:
        assert torch.count_nonzero(conv.bias) == 0
        assert 0.008 < conv.weight.std().item() < 0.012
    assert [c.dilation for c in model.classifier.branches] == [(r, r) for r in (6, 12, 18, 24)]


def test_config_from_params_and_validation() -> None:
    cfg = from_dict(DeepLabV2Config, {"depth": 50, "norm": "group", "aspp_rates": [1, 2], "pretrained": "w.pth"})
    assert cfg.aspp_rates == (1, 2) and str(cfg.pretrained) == "w.pth"
    with pytest.raises(ConfigError, match="norm"):
        from_dict(DeepLabV2Config, {"norm": "layer"})
    with pytest.raises(ValueError, match="aspp_rates"):
        DeepLabV2Config(aspp_rates=())
    with pytest.raises(ValueError, match="depth 152"):
        DeepLabV2(DeepLabV2Config(depth=152))


def test_build_model_loads_pretrained(tmp_path) -> None:
    path = tmp_path / "w.pth"
    saved = _save_with_fc(ResNet(18, width=0.25, norm="group", groups=8), path)
    model = build_model(DeepLabV2Config(depth=18, width=0.25, norm="group", groups=8, pretrained=path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    with pytest.raises(FileNotFoundError):
        build_model(DeepLabV2Config(depth=18, width=0.25, pretrained=tmp_path / "absent.pth"))


def test_class_argmax_is_argmax_with_ties_to_the_first_class() -> None:
    from plca.models.output import class_argmax

    x = torch.tensor([[[[0.2, 0.5]], [[0.7, 0.5]], [[0.7, 0.1]]]])  # [1, 3, 1, 2]: ties 1 = 2 and 0 = 1
    assert class_argmax(x).tolist() == [[[1, 0]]]
    assert class_argmax(x[0], 0).tolist() == [[1, 0]]
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 3, (4, 19, 8, 16), generator=g).float()  # many ties
    assert torch.equal(class_argmax(coarse), coarse.argmax(1))
