"""ClassMix and the strong augmentation of the mean teacher (plca.pseudo; spec mean-teacher.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plca.pseudo import (
    apply_color_jitter,
    blur_kernel_size,
    class_mix,
    class_mix_mask,
    color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    sample_mix_classes,
    strong_augment,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- ClassMix ------------------------------------------------------------------------------------------------


def test_class_mix_mask_hand_case() -> None:
    label = torch.tensor([[0, 1], [2, 255]])
    expected = torch.tensor([[0, 1], [0, 1]])
    for classes in ([1, 255], (255, 1), torch.tensor([1, 255])):
        mask = class_mix_mask(label, classes)
        assert mask.dtype == torch.int64 and torch.equal(mask, expected)
    assert torch.equal(class_mix_mask(label.to(torch.uint8), [255, 1]), expected)
    assert torch.equal(class_mix_mask(label, []), torch.zeros(2, 2, dtype=torch.int64))


def test_class_mix_labels_keep_dtype_and_pasted_255() -> None:
    src = torch.tensor([[0, 1], [2, 255]])
    tgt = torch.tensor([[7, 7], [7, 7]])
    mask = class_mix_mask(src, [1, 255])
    mixed = class_mix(mask, src, tgt)
    assert mixed.dtype == torch.int64
    assert torch.equal(mixed, torch.tensor([[7, 1], [7, 255]]))
    # the mixed weight: 1 where pasted, the target's weight elsewhere
    w = torch.full((2, 2), 0.3)
    mixed_w = class_mix(mask, torch.ones(2, 2), w)
    assert mixed_w.dtype == torch.float32
    assert torch.allclose(mixed_w, torch.tensor([[0.3, 1.0], [0.3, 1.0]]))
    # a batch of labels [B, H, W] with a [B, H, W] mask is used as is
    masks = torch.stack([mask, 1 - mask])
    mixed_b = class_mix(masks, torch.stack([src, src]), torch.stack([tgt, tgt]))
    assert torch.equal(mixed_b[1], torch.tensor([[0, 7], [2, 7]]))


def test_class_mix_images_broadcast_over_channels() -> None:
    src = torch.arange(12, dtype=torch.float64).reshape(3, 2, 2)
    tgt = -torch.ones(3, 2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 0], [0, 1]])
    mixed = class_mix(mask, src, tgt)
    assert mixed.dtype == torch.float64 and mixed.shape == (3, 2, 2)
    for c in range(3):
        assert torch.equal(mixed[c], torch.where(mask.bool(), src[c], tgt[c]))
    # [B, H, W] mask with [B, C, H, W] images: a channel axis is inserted
    masks = torch.stack([mask, 1 - mask])
    mixed_b = class_mix(masks, torch.stack([src, src]), torch.stack([tgt, tgt]))
    assert torch.equal(mixed_b[0], mixed) and torch.equal(mixed_b[1], class_mix(1 - mask, src, tgt))
    # a [H, W] mask with [B, C, H, W] images broadcasts too
    assert torch.equal(class_mix(mask, torch.stack([src, src]), torch.stack([tgt, tgt]))[1], mixed)


def _two_images() -> torch.Tensor:
    """Image 0 holds {0, 1}, image 1 holds {2, 255}: [2, 1, 2, 2]."""
    return torch.tensor([[[[0, 1], [1, 0]]], [[[2, 255], [255, 2]]]])


def test_sample_mix_classes_batch_union_includes_255() -> None:
    labels = _two_images()
    got_foreign = False
    for seed in range(60):
        chosen = sample_mix_classes(labels, generator=_gen(seed))
        assert len(chosen) == 2
        for c in chosen:
            assert c.numel() == 2 and len(set(c.tolist())) == 2  # ceil(4 / 2), without replacement
            assert set(c.tolist()) <= {0, 1, 2, 255}
        got_foreign |= bool(set(chosen[0].tolist()) & {2, 255})
    assert got_foreign  # image 0 draws from the batch's union, so it sometimes gets 2 or 255


def test_sample_mix_classes_per_image_candidates() -> None:
    labels = _two_images()
    seen0, seen1 = set(), set()
    for seed in range(60):
        chosen = sample_mix_classes(labels, generator=_gen(seed), batch_union=False)
        assert chosen[0].numel() == 1 and chosen[1].numel() == 1  # ceil(2 / 2)
        seen0 |= set(chosen[0].tolist())
        seen1 |= set(chosen[1].tolist())
    assert seen0 == {0, 1} and seen1 == {2, 255}


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 2), (5, 3), (6, 3)])
def test_sample_mix_classes_k_is_ceil_half(n: int, k: int) -> None:
    values = [0, 3, 7, 11, 18, 255][:n]
    labels = torch.tensor(values).reshape(1, 1, 1, n).repeat(2, 1, 1, 1)
    for c in sample_mix_classes(labels, generator=_gen(1)):
        assert c.numel() == k and set(c.tolist()) <= set(values)


def test_sample_mix_classes_is_the_seeded_randperm() -> None:
    labels = _two_images()
    a = sample_mix_classes(labels, generator=_gen(7))
    b = sample_mix_classes(labels, generator=_gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the documented draw: randperm over the sorted unique values, first ceil(n / 2), one per image in order
    g = _gen(7)
    candidates = torch.tensor([0, 1, 2, 255])
    expected = [candidates[torch.randperm(4, generator=g)[:2]] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, expected, strict=True))
    # [B, H, W] labels work too
    c = sample_mix_classes(labels[:, 0], generator=_gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


# ---- Gaussian blur -------------------------------------------------------------------------------------------


def test_blur_kernel_size_rule() -> None:
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(128) == 13
    assert blur_kernel_size(512) == 51
    assert blur_kernel_size(1024) == 103
    assert blur_kernel_size(5) == 1 and blur_kernel_size(10) == 1
    assert blur_kernel_size(30) == 3  # 0.1 * 30 = 3.0000000000000004 as a float product, ceil 4, minus 1
    with pytest.raises(ValueError):
        blur_kernel_size(0)


def test_gaussian_blur_constant_image_stays_constant() -> None:
    img = torch.full((2, 3, 64, 128), 0.7, dtype=torch.float64)
    out = gaussian_blur(img, 1.1)
    assert out.dtype == torch.float64
    assert torch.allclose(out, img, atol=1e-12)


def _kernel_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-x**2 / (2 * sigma**2))
    return k / k.sum()


def test_gaussian_blur_impulse_response() -> None:
    img = torch.zeros(1, 1, 64, 128, dtype=torch.float64)
    img[0, 0, 32, 64] = 1.0
    sigma = 1.0
    out = gaussian_blur(img, sigma)[0, 0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-12)
    patch = out[32 - 3:32 + 4, 64 - 6:64 + 7]  # the 7 x 13 footprint
    assert torch.allclose(patch, torch.outer(_kernel_1d(7, sigma), _kernel_1d(13, sigma)), atol=1e-12)
    assert torch.allclose(patch, patch.flip(0)) and torch.allclose(patch, patch.flip(1))
    assert out.sum().item() == pytest.approx(patch.sum().item(), abs=1e-12)


def test_gaussian_blur_matches_a_2d_reflect_convolution() -> None:
    torch.manual_seed(0)
    img = torch.rand(2, 3, 20, 40, dtype=torch.float64)
    sigma = 0.8
    ky, kx = blur_kernel_size(20), blur_kernel_size(40)
    assert (ky, kx) == (1, 3)
    kernel = torch.outer(_kernel_1d(ky, sigma), _kernel_1d(kx, sigma))
    padded = F.pad(img, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    expected = F.conv2d(padded.reshape(1, 6, *padded.shape[2:]), kernel.expand(6, 1, ky, kx), groups=6)
    assert torch.allclose(gaussian_blur(img, sigma), expected.reshape(img.shape), atol=1e-12)


def test_gaussian_blur_per_image_sigma() -> None:
    torch.manual_seed(1)
    img = torch.rand(2, 3, 64, 64)
    out = gaussian_blur(img, torch.tensor([0.3, 1.1]))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0:1], gaussian_blur(img[0:1], 0.3), atol=1e-6)
    assert torch.allclose(out[1:2], gaussian_blur(img[1:2], 1.1), atol=1e-6)
    assert not torch.allclose(out[0:1], gaussian_blur(img[0:1], 1.1), atol=1e-4)
    with pytest.raises(ValueError):
        gaussian_blur(img, torch.tensor([0.3, 0.5, 0.7]))


# ---- colour jitter -------------------------------------------------------------------------------------------


def test_rgb_hsv_hand_values_and_round_trip() -> None:
    rgb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [1, 1, 0], [0, 0, 0]],
                       dtype=torch.float64).T.reshape(1, 3, 1, 6)
    hsv = rgb_to_hsv(rgb)[0, :, 0]
    two_pi = 2 * math.pi
    assert torch.allclose(hsv[0], torch.tensor([0, two_pi / 3, 2 * two_pi / 3, 0, two_pi / 6, 0],
                                               dtype=torch.float64))
    assert torch.allclose(hsv[1], torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(hsv[2], torch.tensor([1, 1, 1, 0.5, 1, 0], dtype=torch.float64))
    torch.manual_seed(2)
    img = torch.rand(3, 3, 16, 16)
    hsv = rgb_to_hsv(img)
    assert float(hsv[:, 0].min()) >= 0 and float(hsv[:, 0].max()) < 2 * math.pi + 1e-6
    assert torch.allclose(hsv_to_rgb(hsv), img, atol=1e-5)


def test_color_jitter_zero_strength_is_identity() -> None:
    torch.manual_seed(3)
    img = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    out = color_jitter(img, 0.0, _gen(0))
    assert out.dtype == torch.float64
    assert torch.allclose(out, img, atol=1e-5)


def test_color_jitter_stays_in_unit_range_and_is_seeded() -> None:
    torch.manual_seed(4)
    img = torch.rand(4, 3, 16, 16)
    out = color_jitter(img, 0.5, _gen(5))
    assert out.dtype == torch.float32 and out.shape == img.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, color_jitter(img, 0.5, _gen(5)))
    assert not torch.allclose(out, img, atol=1e-3)
    with pytest.raises(ValueError):
        color_jitter(img, 0.6, _gen(5))


def test_apply_color_jitter_single_transforms() -> None:
    img = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64).reshape(1, 3, 1, 1)
    one, zero = torch.ones(1), torch.zeros(1)
    bright = apply_color_jitter(img, torch.tensor([0.1]), one, one, zero, order=[0])
    assert torch.allclose(bright.flatten(), torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64))  # clamped
    contrast = apply_color_jitter(img, zero, torch.tensor([1.2]), one, zero, order=[1])
    assert torch.allclose(contrast.flatten(), torch.tensor([0.12, 0.6, 1.0], dtype=torch.float64))  # no mean
    grey = apply_color_jitter(img, zero, one, torch.tensor([0.0]), zero, order=[2])
    assert torch.allclose(grey.flatten(), torch.full((3,), 0.95, dtype=torch.float64))  # S = 0: V everywhere
    red = torch.tensor([1.0, 0, 0], dtype=torch.float64).reshape(1, 3, 1, 1)
    cyan = apply_color_jitter(red, zero, one, one, torch.tensor([math.pi]), order=[3])
    assert torch.allclose(cyan.flatten(), torch.tensor([0.0, 1, 1], dtype=torch.float64), atol=1e-5)


def test_hue_shift_by_two_pi_is_identity() -> None:
    torch.manual_seed(6)
    img = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    zero, one = torch.zeros(2), torch.ones(2)
    for shift in (2 * math.pi, -2 * math.pi):
        out = apply_color_jitter(img, zero, one, one, torch.full((2,), shift), order=[3])
        assert torch.allclose(out, img, atol=1e-5)
    # a shift and its 2 pi complement give the same image
    a = apply_color_jitter(img, zero, one, one, torch.full((2,), 0.5), order=[3])
    b = apply_color_jitter(img, zero, one, one, torch.full((2,), 0.5 - 2 * math.pi), order=[3])
    assert torch.allclose(a, b, atol=1e-5)


# ---- strong augmentation -------------------------------------------------------------------------------------


def _seed_where(predicate) -> tuple[int, float, float]:
    for seed in range(1000):
        u, u2 = torch.rand(2, generator=_gen(seed), dtype=torch.float64).tolist()
        if predicate(u, u2):
            return seed, u, u2
    raise AssertionError("no seed found")


def _normalised(seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    img01 = torch.rand(2, 3, 32, 64)
    return (img01 - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)


def test_strong_augment_identity_when_both_uniforms_are_low() -> None:
    seed, u, u2 = _seed_where(lambda u, u2: u <= 0.2 and u2 <= 0.5)
    assert u <= 0.2 and u2 <= 0.5
    images = _normalised()
    out = strong_augment(images, MEAN, STD, generator=_gen(seed))
    assert torch.equal(out, images)


def test_strong_augment_is_seeded_and_changes_the_images() -> None:
    images = _normalised()
    before = images.clone()
    seed, u, u2 = _seed_where(lambda u, u2: u > 0.2 and u2 > 0.5)
    a = strong_augment(images, MEAN, STD, generator=_gen(seed))
    b = strong_augment(images, MEAN, STD, generator=_gen(seed))
    assert torch.equal(images, before)  # pure
    assert a.dtype == images.dtype and a.shape == images.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, images, atol=1e-3)
    for pred in (lambda u, u2: u > 0.2 and u2 <= 0.5, lambda u, u2: u <= 0.2 and u2 > 0.5):
        seed, _, _ = _seed_where(pred)
        assert not torch.allclose(strong_augment(images, MEAN, STD, generator=_gen(seed)), images, atol=1e-3)


def test_strong_augment_follows_the_documented_draws() -> None:
    images = _normalised()
    mean, std = torch.tensor(MEAN).reshape(1, 3, 1, 1), torch.tensor(STD).reshape(1, 3, 1, 1)
    # jitter only: u, u2, then each image's colour jitter on its own, in [0, 1] units
    seed, _, _ = _seed_where(lambda u, u2: u > 0.2 and u2 <= 0.5)
    g = _gen(seed)
    torch.rand(2, generator=g, dtype=torch.float64)
    img01 = images * std + mean
    expected = torch.cat([color_jitter(img01[i:i + 1], 0.2, g) for i in range(2)])
    got = strong_augment(images, MEAN, STD, generator=_gen(seed))
    assert torch.allclose(got * std + mean, expected, atol=1e-5)
    # blur only: sigma ~ U(0.15, 1.15) per image
    seed, _, _ = _seed_where(lambda u, u2: u <= 0.2 and u2 > 0.5)
    g = _gen(seed)
    torch.rand(2, generator=g, dtype=torch.float64)
    sigma = 0.15 + torch.rand(2, generator=g, dtype=torch.float64)
    assert torch.allclose(strong_augment(images, MEAN, STD, generator=_gen(seed)),
                          gaussian_blur(images, sigma.float()), atol=1e-6)
