"""Writers of tiny fixtures in exactly the on-disk formats of the real datasets (helpers, not tests).

- GTA5: `images/NNNNN.png` (RGB, 5-digit ids from 00001) and `labels/NNNNN.png`, palette ('P') PNGs whose
  palette indices are Cityscapes label ids and whose palette holds the Cityscapes colours.
- Cityscapes: `leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png` and
  `gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png` (8-bit grey), optionally `_gtFine_color.png`
  (RGBA) and `_gtFine_instanceIds.png` (16-bit grey, id * 1000 + instance for instance classes).
- SYNTHIA RAND-CITYSCAPES: `RGB/NNNNNNN.png` (7-digit ids from 0000000) and `GT/LABELS/NNNNNNN.png`, 16-bit
  3-channel PNGs with the class id in the first RGB channel and an instance id in the second.

Each writer returns {name: label-id array as stored in the file} so a test can compare a reader's output.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from PIL import Image

# Label ids the fixtures draw: mostly train classes plus a few ids that map to ignore (0 unlabeled,
# 1 ego vehicle, 4 static, 9 parking), as real label maps hold.
CS_IDS_DRAWN = (0, 1, 4, 7, 8, 9, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# SYNTHIA class ids drawn: all 23 (0 void, 13/14/22 without a Cityscapes class, 16/18/20 ignored in training).
SYNTHIA_IDS_DRAWN = tuple(range(23))
# Cityscapes label ids whose instances are numbered in instanceIds PNGs (hasInstances in cityscapesscripts).
CS_INSTANCE_IDS = frozenset(lab.id for lab in CS_LABELS if lab.hasInstances and lab.id >= 0)

DEFAULT_CITIES: dict[str, tuple[str, ...]] = {
    "train": ("aachen", "bochum"),
    "val": ("frankfurt", "lindau"),
    "test": ("berlin",),
}


def cityscapes_id_palette() -> np.ndarray:
    """[256, 3] uint8 RGB: colour of each Cityscapes label id (black elsewhere), as in GTA5's label PNGs."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for lab in CS_LABELS:
        if lab.id >= 0:
            pal[lab.id] = lab.color
    return pal


def random_label(rng: np.random.Generator, size: tuple[int, int], ids: tuple[int, ...], blocks: int = 6) -> np.ndarray:
    """[H, W] uint8 label map of rectangular blocks drawn from `ids` (every map holds several classes)."""
    h, w = size
    out = np.full((h, w), ids[int(rng.integers(len(ids)))], dtype=np.uint8)
    for _ in range(blocks):
        y0, x0 = int(rng.integers(h)), int(rng.integers(w))
        y1, x1 = y0 + int(rng.integers(1, h + 1)), x0 + int(rng.integers(1, w + 1))
        out[y0:y1, x0:x1] = ids[int(rng.integers(len(ids)))]
    return out


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 RGB noise."""
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 (or uint16) array as a PNG (cv2 stores BGR, so flip the channels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")


def write_grey_png(path: Path, values: np.ndarray) -> None:
    """Write a single-channel uint8 or uint16 PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), values):
        raise OSError(f"could not write {path}")


def write_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """Write a palette ('P' mode) PNG: `indices` [H, W] uint8 are stored as palette indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = indices.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(indices, dtype=np.uint8).tobytes())
    img.putpalette(palette.astype(np.uint8).ravel().tolist())
    img.save(path)


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes (an interrupted download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])


def write_gta5(
    root: Path | str, n: int, size: tuple[int, int] = (12, 20), seed: int = 0, palette: bool = True
) -> dict[str, np.ndarray]:
    """GTA5 layout with `n` images 00001..; labels are palette PNGs like the real ones (or grey if not palette)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pal = cityscapes_id_palette()
    out: dict[str, np.ndarray] = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        ids = random_label(rng, size, CS_IDS_DRAWN)
        write_rgb_png(root / "images" / f"{name}.png", random_image(rng, size))
        if palette:
            write_palette_png(root / "labels" / f"{name}.png", ids, pal)
        else:
            write_grey_png(root / "labels" / f"{name}.png", ids)
        out[name] = ids
    return out


def cityscapes_paths(root: Path | str, split: str, city: str, seq: int, frame: int) -> tuple[Path, Path]:
    """(image, labelIds) paths of one Cityscapes frame."""
    root = Path(root)
    stem = f"{city}_{seq:06d}_{frame:06d}"
    return (
        root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
    )


def write_cityscapes(
    root: Path | str,
    splits: dict[str, int] | None = None,
    cities: dict[str, tuple[str, ...]] | None = None,
    size: tuple[int, int] = (16, 32),
    seed: int = 0,
    extras: bool = False,
) -> dict[str, np.ndarray]:
    """Cityscapes layout: per split, `n` frames spread round-robin over that split's cities.

    extras=True also writes `_gtFine_color.png` (RGBA) and `_gtFine_instanceIds.png` (uint16) like the real set.
    """
    root = Path(root)
    splits = {"train": 4, "val": 2} if splits is None else splits
    cities = DEFAULT_CITIES if cities is None else cities
    rng = np.random.default_rng(seed)
    pal = cityscapes_id_palette()
    out: dict[str, np.ndarray] = {}
    for split, n in splits.items():
        names = cities.get(split, (f"{split}city",))
        for i in range(n):
            city = names[i % len(names)]
            seq, frame = i // len(names), 19 + 10 * i  # real frame numbers are sparse, e.g. _000019
            img_path, lab_path = cityscapes_paths(root, split, city, seq, frame)
            ids = random_label(rng, size, CS_IDS_DRAWN)
            write_rgb_png(img_path, random_image(rng, size))
            write_grey_png(lab_path, ids)
            if extras:
                stem = lab_path.name[: -len("_labelIds.png")]
                rgba = np.concatenate([pal[ids], np.full((*size, 1), 255, np.uint8)], axis=-1)
                path = lab_path.with_name(f"{stem}_color.png")
                cv2.imwrite(str(path), np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]))
                inst = ids.astype(np.uint16)
                has = np.isin(ids, list(CS_INSTANCE_IDS))
                inst[has] = ids[has].astype(np.uint16) * 1000 + 1
                write_grey_png(lab_path.with_name(f"{stem}_instanceIds.png"), inst)
            out[img_path.name[: -len("_leftImg8bit.png")]] = ids
    return out


def write_synthia(root: Path | str, n: int, size: tuple[int, int] = (12, 20), seed: int = 0) -> dict[str, np.ndarray]:
    """SYNTHIA RAND-CITYSCAPES layout with `n` frames 0000000..; returns class ids (first RGB channel)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        name = f"{i:07d}"
        ids = random_label(rng, size, SYNTHIA_IDS_DRAWN)
        gt = np.zeros((*size, 3), dtype=np.uint16)
        gt[..., 0] = ids
        gt[..., 1] = rng.integers(0, 500, size)  # instance id
        write_rgb_png(root / "RGB" / f"{name}.png", random_image(rng, size))
        write_rgb_png(root / "GT" / "LABELS" / f"{name}.png", gt)
        out[name] = ids
    return out
