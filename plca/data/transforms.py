"""Training and evaluation transforms on numpy arrays: short-edge resize, crop, flip, normalise (cv2 only).

Images leave as float32 [3, H, W] normalised arrays, labels as int64 [H, W] train ids (255 = ignore), soft labels
(a sample that has them) as float32 [C, H, W], resized bilinearly and renormalised per pixel, zero where padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from plca.data.datasets import Sample
from plca.data.labels import IGNORE_INDEX

# ImageNet statistics of RGB pixels in [0, 1] (torchvision's convention), the usual choice for backbones
# trained from scratch or from PyTorch-style ImageNet weights.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# Caffe-style DeepLab-v2 weights (used by PLCA, AdaptSegNet, ADVENT) expect BGR 0-255 minus this mean, std 1.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


@dataclass
class TransformConfig:
    """Augmentation and normalisation.

    resize: (w, h) every image is resized to, aspect not kept (the released AdaptSegNet/ADVENT/IntraDA codes:
      GTA5 1280x720, Cityscapes 1024x512); None keeps the size. Exclusive with short_edge.
    short_edge: [min, max] for the shorter image side, drawn as a random integer per sample (aspect kept);
      None keeps the size. crop: (h, w) random crop, padded when the image is smaller; None keeps the whole image.
    mean/std are given in `channel_order` and in pixel units of `scale` (1: pixels in [0, 1]; 255: [0, 255]).
    Caffe style: channel_order "bgr", scale 255, mean CAFFE_MEAN_BGR, std (1, 1, 1).
    """

    short_edge: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip: bool = True
    resize: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std: tuple[float, float, float] = IMAGENET_STD_RGB
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: Literal[1, 255] = 1

    def __post_init__(self) -> None:
        if self.resize is not None:
            if min(self.resize) <= 0:
                raise ValueError(f"resize must be a positive (w, h), got {self.resize}")
            if self.short_edge is not None:
                raise ValueError("resize and short_edge both resize the image: set one of them")
        if self.short_edge is not None:
            lo, hi = self.short_edge
            if not 0 < lo <= hi:
                raise ValueError(f"short_edge must be [min, max] with 0 < min <= max, got {self.short_edge}")
        if self.crop is not None and min(self.crop) <= 0:
            raise ValueError(f"crop must be a positive (h, w), got {self.crop}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if self.scale not in (1, 255):
            raise ValueError(f"scale must be 1 or 255, got {self.scale}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")


def normalize(image: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [3, H, W] float32 in the configured channel order, scale, mean and std."""
    x = image.astype(np.float32)
    if cfg.channel_order == "bgr":
        x = x[..., ::-1]
    if cfg.scale == 1:
        x = x / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def denormalize(image: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    """Inverse of `normalize`: [3, H, W] float -> [H, W, 3] uint8 RGB (for figures)."""
    x = image.transpose(1, 2, 0) * np.asarray(cfg.std, np.float32) + np.asarray(cfg.mean, np.float32)
    if cfg.scale == 1:
        x = x * 255.0
    if cfg.channel_order == "bgr":
        x = x[..., ::-1]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize_short_edge(
    image: np.ndarray, label: np.ndarray | None, short: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so the shorter side is `short`, keeping the aspect: bilinear image, nearest label."""
    h, w = image.shape[:2]
    f = short / min(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))  # cv2 wants (w, h)
    if size == (w, h):
        return image, label
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


def resize_soft(soft: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C, H, W] soft labels resized to `size` = (w, h): bilinear per class, then renormalised per pixel (CRST's
    loader), so a pixel mixing labelled and unlabelled (all-zero) neighbours keeps weights summing to 1."""
    if (soft.shape[2], soft.shape[1]) == tuple(size):
        return soft
    # cv2 resizes an [H, W, C] array channel by channel (at most 512 channels)
    out = cv2.resize(np.ascontiguousarray(soft.transpose(1, 2, 0)), tuple(size), interpolation=cv2.INTER_LINEAR)
    out = out.reshape(size[1], size[0], -1).transpose(2, 0, 1)
    total = out.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(np.divide(out, total, out=np.zeros_like(out), where=total > 0), dtype=np.float32)


def train_transform(
    sample: Sample, cfg: TransformConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed or random short-edge resize, random crop (padding: normalised 0 = the mean / label 255), random flip.

    Random draws, in order: short edge, crop offsets, flip; the same rng state gives the same output.
    A sample without a label (target images in adaptation) gets an all-ignore label. A sample with soft labels
    gets them back third, through the same resize (`resize_soft`), crop (padding 0) and flip.
    """
    image, soft = sample.image, sample.soft_label
    label = sample.label if sample.label is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
    if cfg.resize is not None and (image.shape[1], image.shape[0]) != tuple(cfg.resize):
        image = cv2.resize(image, tuple(cfg.resize), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, tuple(cfg.resize), interpolation=cv2.INTER_NEAREST_EXACT)
    if cfg.short_edge is not None:
        image, label = resize_short_edge(image, label, int(rng.integers(cfg.short_edge[0], cfg.short_edge[1] + 1)))
    if soft is not None:
        soft = resize_soft(soft, (image.shape[1], image.shape[0]))
    h, w = image.shape[:2]
    ch, cw = cfg.crop if cfg.crop is not None else (h, w)
    # Offset of the crop window in the image; when the image is smaller, the image sits at a random offset
    # inside the padded window instead (negative offset).
    y0 = int(rng.integers(0, h - ch + 1)) if h >= ch else -int(rng.integers(0, ch - h + 1))
    x0 = int(rng.integers(0, w - cw + 1)) if w >= cw else -int(rng.integers(0, cw - w + 1))
    flip = cfg.flip and bool(rng.random() < 0.5)

    sy, sx = max(y0, 0), max(x0, 0)  # source window
    dy, dx = max(-y0, 0), max(-x0, 0)  # destination offset
    nh, nw = min(h - sy, ch - dy), min(w - sx, cw - dx)
    out_img = np.zeros((3, ch, cw), np.float32)
    out_lab = np.full((ch, cw), IGNORE_INDEX, np.int64)
    out_img[:, dy : dy + nh, dx : dx + nw] = normalize(image[sy : sy + nh, sx : sx + nw], cfg)
    out_lab[dy : dy + nh, dx : dx + nw] = label[sy : sy + nh, sx : sx + nw]
    if flip:
        out_img = np.ascontiguousarray(out_img[:, :, ::-1])
        out_lab = np.ascontiguousarray(out_lab[:, ::-1])
    if soft is None:
        return out_img, out_lab
    out_soft = np.zeros((soft.shape[0], ch, cw), np.float32)
    out_soft[:, dy : dy + nh, dx : dx + nw] = soft[:, sy : sy + nh, sx : sx + nw]
    if flip:
        out_soft = np.ascontiguousarray(out_soft[:, :, ::-1])
    return out_img, out_lab, out_soft


def eval_transform(
    sample: Sample, cfg: TransformConfig, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalise the image, optionally resized to `size` = (w, h); the label stays at its original size
    (predictions are upsampled to it for evaluation)."""
    image = sample.image
    if size is not None and (image.shape[1], image.shape[0]) != tuple(size):
        image = cv2.resize(image, tuple(size), interpolation=cv2.INTER_LINEAR)
    label = None if sample.label is None else sample.label.astype(np.int64)
    return normalize(image, cfg), label
