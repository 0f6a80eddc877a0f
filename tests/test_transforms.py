"""Training/evaluation transforms: values, shapes, padding, flip, determinism, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from plca.config import ConfigError, from_dict
from plca.data.datasets import Sample
from plca.data.transforms import (
    CAFFE_MEAN_BGR,
    TransformConfig,
    denormalize,
    eval_transform,
    normalize,
    resize_short_edge,
    train_transform,
)


def _sample(h: int = 20, w: int = 40, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # label encodes the column so that flips and crops can be checked exactly
    label = np.tile((np.arange(w) % 19).astype(np.uint8), (h, 1))
    return Sample(image=image, label=label, name="x")


def test_normalisation_values_rgb_and_caffe():
    img = np.zeros((1, 1, 3), np.uint8)
    img[0, 0] = (255, 128, 0)  # R, G, B
    rgb = TransformConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    np.testing.assert_allclose(normalize(img, rgb)[:, 0, 0], [1.0, (128 / 255 - 0.5) / 0.25, -1.0], atol=1e-6)
    caffe = TransformConfig(mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="bgr", scale=255)
    out = normalize(img, caffe)
    assert out.shape == (3, 1, 1) and out.dtype == np.float32
    expected = [0 - CAFFE_MEAN_BGR[0], 128 - CAFFE_MEAN_BGR[1], 255 - CAFFE_MEAN_BGR[2]]  # B, G, R
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-5)
    for cfg in (rgb, caffe):
        np.testing.assert_array_equal(denormalize(normalize(img, cfg), cfg), img)


def test_no_augmentation_is_identity_up_to_normalisation():
    s = _sample()
    cfg = TransformConfig(flip=False)
    img, lab = train_transform(s, cfg, np.random.default_rng(0))
    assert img.shape == (3, 20, 40) and img.dtype == np.float32
    assert lab.shape == (20, 40) and lab.dtype == np.int64
    np.testing.assert_array_equal(img, normalize(s.image, cfg))
    np.testing.assert_array_equal(lab, s.label)


def test_flip_mirrors_image_and_label_together():
    s = _sample()
    cfg = TransformConfig(flip=True)
    flipped = 0
    for seed in range(20):
        img, lab = train_transform(s, cfg, np.random.default_rng(seed))
        if lab[0, 0] == s.label[0, -1]:
            flipped += 1
            np.testing.assert_array_equal(lab, s.label[:, ::-1])
            np.testing.assert_array_equal(img, normalize(s.image, cfg)[:, :, ::-1])
        else:
            np.testing.assert_array_equal(lab, s.label)
            np.testing.assert_array_equal(img, normalize(s.image, cfg))
    assert 3 <= flipped <= 17  # about half


def test_crop_is_aligned_window():
    s = _sample(30, 50)
    cfg = TransformConfig(crop=(10, 16), flip=False)
    img, lab = train_transform(s, cfg, np.random.default_rng(3))
    assert img.shape == (3, 10, 16) and lab.shape == (10, 16)
    full = normalize(s.image, cfg)
    # find the window from the image and check the label came from the same place
    hits = [
        (y, x) for y in range(21) for x in range(35) if np.array_equal(full[:, y : y + 10, x : x + 16], img)
    ]
    assert len(hits) == 1
    y, x = hits[0]
    np.testing.assert_array_equal(lab, s.label[y : y + 10, x : x + 16])


def test_padding_when_smaller_than_crop():
    s = _sample(6, 10)
    cfg = TransformConfig(crop=(12, 16), flip=False)
    img, lab = train_transform(s, cfg, np.random.default_rng(0))
    assert img.shape == (3, 12, 16)
    valid = lab != 255
    assert valid.sum() == 6 * 10  # the whole image is inside, the rest is ignore
    assert (img[:, ~valid] == 0).all()  # padded with the mean = 0 after normalisation
    ys, xs = np.nonzero(valid)
    np.testing.assert_array_equal(img[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], normalize(s.image, cfg))


def test_short_edge_in_range_and_aspect_kept():
    s = _sample(20, 40)
    cfg = TransformConfig(short_edge=(10, 30), flip=False)
    seen = set()
    for seed in range(30):
        img, lab = train_transform(s, cfg, np.random.default_rng(seed))
        h, w = lab.shape
        assert 10 <= h <= 30 and w == 2 * h
        assert img.shape[1:] == (h, w)
        assert set(np.unique(lab)) <= set(range(19))  # nearest: no blended label values
        seen.add(h)
    assert len(seen) > 5
    img, lab = resize_short_edge(s.image, s.label, 10)
    assert img.shape == (10, 20, 3) and lab.shape == (10, 20)
    np.testing.assert_array_equal(lab[0], s.label[0, 1::2])  # pixel-centre sampling


def test_same_rng_state_same_output():
    s = _sample(30, 50)
    cfg = TransformConfig(short_edge=(20, 40), crop=(16, 24), flip=True)
    a = train_transform(s, cfg, np.random.default_rng(7))
    b = train_transform(s, cfg, np.random.default_rng(7))
    c = train_transform(s, cfg, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_unlabelled_sample_gets_ignore_label():
    s = _sample()
    s.label = None
    _, lab = train_transform(s, TransformConfig(crop=(8, 8)), np.random.default_rng(0))
    assert (lab == 255).all()


def test_eval_transform_resizes_image_only():
    s = _sample(20, 40)
    cfg = TransformConfig()
    img, lab = eval_transform(s, cfg, size=(20, 10))
    assert img.shape == (3, 10, 20)
    assert lab.shape == (20, 40) and lab.dtype == np.int64
    np.testing.assert_array_equal(lab, s.label)
    img, _ = eval_transform(s, cfg)
    np.testing.assert_array_equal(img, normalize(s.image, cfg))


def test_config_validation_and_from_dict():
    with pytest.raises(ValueError, match="short_edge"):
        TransformConfig(short_edge=(30, 10))
    with pytest.raises(ValueError, match="crop"):
        TransformConfig(crop=(0, 10))
    cfg = from_dict(TransformConfig, {"short_edge": [10, 20], "crop": [8, 16], "channel_order": "bgr", "scale": 255})
    assert cfg.short_edge == (10, 20) and cfg.crop == (8, 16) and cfg.scale == 255
    with pytest.raises(ConfigError, match="scale"):
        from_dict(TransformConfig, {"scale": 100})


def _soft_sample(h: int = 20, w: int = 40) -> Sample:
    """A sample whose soft labels are the one-hot of its label, except column 0: unlabelled (all zero)."""
    sample = _sample(h, w)
    soft = (np.arange(19)[:, None, None] == sample.label[None]).astype(np.float32)
    soft[:, :, 0] = 0.0
    return Sample(image=sample.image, label=sample.label, name="x", soft_label=soft)


@pytest.mark.parametrize("cfg", [TransformConfig(crop=(8, 16)), TransformConfig(crop=(30, 50)),
                                 TransformConfig(short_edge=(10, 30), crop=(12, 12)),
                                 TransformConfig(resize=(30, 14), crop=None)])
def test_soft_labels_follow_the_image_through_every_transform(cfg: TransformConfig):
    """Same draws as without soft labels (image and label unchanged); the soft map takes the same crop (zero
    padding) and flip, and a resize renormalises each pixel's weights; unlabelled pixels keep all-zero weights."""
    sample = _soft_sample()
    for seed in range(6):
        image, label, soft = train_transform(sample, cfg, np.random.default_rng(seed))
        plain_image, plain_label = train_transform(Sample(sample.image, sample.label, "x"), cfg,
                                                   np.random.default_rng(seed))
        np.testing.assert_array_equal(image, plain_image)
        np.testing.assert_array_equal(label, plain_label)
        assert soft.dtype == np.float32 and soft.shape == (19, *label.shape)
        total = soft.sum(0)
        assert np.allclose(total[total > 0], 1.0, atol=1e-5) and (soft >= 0).all()
        if cfg.short_edge is None and cfg.resize is None:  # no resize: exactly the label's one-hot, or zeros
            labelled = (label != 255) & (total > 0)
            np.testing.assert_array_equal(soft.argmax(0)[labelled], label[labelled])
            assert (total[label == 255] == 0).all()  # padding
        else:  # interpolated: the soft argmax is the nearest label's away from column borders
            agree = soft.argmax(0)[total > 0] == label[total > 0]
            assert agree.mean() > 0.4


def test_resize_soft_renormalises_a_pixel_between_labelled_and_unlabelled_ones():
    from plca.data.transforms import resize_soft

    soft = np.zeros((2, 1, 4), np.float32)
    soft[0, 0, :2] = 1.0  # class 0 on the left half, unlabelled right half
    out = resize_soft(soft, (8, 1))
    assert out.shape == (2, 1, 8)
    np.testing.assert_allclose(out[0, 0, :4], 1.0)  # bilinear 0.x of class 0 and 0 elsewhere: renormalised to 1
    assert (out[:, 0, 5:] == 0).all()  # far from any labelled pixel: still unlabelled
    assert resize_soft(soft, (4, 1)) is soft  # already at that size
