"""Verification of an extracted (or resized) dataset folder in its real on-disk layout.

Checks, per dataset layout: every image has its label and the reverse, the number of pairs per split, PNG files
that open (headers always, full decoding with `check_pixels`), image and label sizes that agree, and label values
inside the dataset's class table (plca.data.labels). GTA5 holds a few frames whose image and label sizes differ:
those are reported (known ones named as such) rather than failing the check, and the resize stage brings their
labels to the image size.

Layouts (paths relative to the dataset root):
  gta5        images/NNNNN.png, labels/NNNNN.png (palette PNG; palette index = Cityscapes label id); split "all"
  cityscapes  leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png, gtFine/<split>/<city>/<stem>_gtFine_labelIds.png
  synthia     RGB/NNNNNNN.png, GT/LABELS/NNNNNNN.png (16-bit, class id in the first RGB channel); split "all"
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from plca.data.labels import CITYSCAPES_VALID_IDS, SYNTHIA_VALID_IDS

log = logging.getLogger(__name__)

Layout = Literal["gta5", "cityscapes", "synthia"]
LAYOUTS: tuple[str, ...] = ("gta5", "cityscapes", "synthia")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG header: signature, IHDR chunk length and type, then width, height, bit depth, colour type.
_PNG_HEADER_BYTES = 26
_CS_IMAGE_SUFFIX = "_leftImg8bit.png"
_CS_LABEL_SUFFIX = "_gtFine_labelIds.png"
# How many problems an error message lists before "... and N more".
_MAX_LISTED = 20
# Pairs handed to a worker process at a time (amortises inter-process overhead on tiny files).
_CHUNKSIZE = 16


class DatasetError(ValueError):
    """An extracted dataset does not have the expected layout, counts or contents."""


@dataclass
class VerifyConfig:
    """Options of dataset verification."""

    #: Decode every PNG and check label values (slow on the full sets); False checks names, counts and headers.
    check_pixels: bool = True
    #: Worker processes for the per-file checks; 0 = one per CPU core, 1 = in this process.
    workers: int = 0
    #: Show a progress bar over the pairs.
    progress: bool = False


@dataclass(frozen=True)
class Pair:
    """One image and its label; `name` identifies the frame (GTA5 id, Cityscapes stem, SYNTHIA id)."""

    split: str
    name: str
    image: Path
    label: Path


@dataclass
class VerifyReport:
    """What verification found; `errors` name the files concerned."""

    layout: str
    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    #: Frames whose image and label sizes differ: name -> (image WxH, label WxH).
    size_mismatches: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)
    #: The mismatching frames that the sources file lists as known.
    known_mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_failed(self) -> VerifyReport:
        """Raise DatasetError listing the errors (first few) if there are any; return self otherwise."""
        if self.errors:
            listed = "\n  ".join(self.errors[:_MAX_LISTED])
            more = f"\n  ... and {len(self.errors) - _MAX_LISTED} more" if len(self.errors) > _MAX_LISTED else ""
            raise DatasetError(f"{self.root}: {self.layout} dataset failed verification:\n  {listed}{more}")
        return self


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's header without decoding it; errors name the file."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_PNG_HEADER_BYTES)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    if len(head) < _PNG_HEADER_BYTES or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file (bad signature or header)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, colour


def _pairs_by_stem(
    split: str, images: Iterable[Path], label_dir: Path, label_name: str, image_suffix: str, errors: list[str]
) -> list[Pair]:
    pairs = []
    for image in sorted(images):
        name = image.name[: -len(image_suffix)]
        label = label_dir / label_name.format(name=name)
        if not label.is_file():
            errors.append(f"{image}: no matching label {label}")
            continue
        pairs.append(Pair(split, name, image, label))
    return pairs


def _flat_pairs(root: Path, image_dir: str, label_dir: str, errors: list[str]) -> list[Pair]:
    images_root, labels_root = root / image_dir, root / label_dir
    for folder in (images_root, labels_root):
        if not folder.is_dir():
            errors.append(f"{folder}: folder missing")
    if errors:
        return []
    pairs = _pairs_by_stem("all", images_root.glob("*.png"), labels_root, "{name}.png", ".png", errors)
    image_names = {p.stem for p in images_root.glob("*.png")}
    for label in sorted(labels_root.glob("*.png")):
        if label.stem not in image_names:
            errors.append(f"{label}: no matching image in {images_root}")
    return pairs


def _cityscapes_pairs(root: Path, splits: Iterable[str], errors: list[str]) -> list[Pair]:
    pairs: list[Pair] = []
    for split in splits:
        img_root, lab_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (img_root, lab_root):
            if not folder.is_dir():
                errors.append(f"{folder}: folder missing")
        if not (img_root.is_dir() and lab_root.is_dir()):
            continue
        for city_dir in sorted(p for p in img_root.iterdir() if p.is_dir()):
            found = _pairs_by_stem(
                split,
                city_dir.glob(f"*{_CS_IMAGE_SUFFIX}"),
                lab_root / city_dir.name,
                "{name}" + _CS_LABEL_SUFFIX,
                _CS_IMAGE_SUFFIX,
                errors,
            )
            pairs.extend(found)
        image_stems = {p.name[: -len(_CS_IMAGE_SUFFIX)] for p in img_root.glob(f"*/*{_CS_IMAGE_SUFFIX}")}
        for label in sorted(lab_root.glob(f"*/*{_CS_LABEL_SUFFIX}")):
            if label.name[: -len(_CS_LABEL_SUFFIX)] not in image_stems:
                errors.append(f"{label}: no matching image in {img_root}")
    return pairs


def cityscapes_splits(root: Path | str) -> list[str]:
    """Splits present under leftImg8bit/ (train, val, test in the real set)."""
    base = Path(root) / "leftImg8bit"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def list_pairs(
    root: Path | str, layout: Layout, splits: Iterable[str] | None = None, errors: list[str] | None = None
) -> list[Pair]:
    """Image/label pairs of a dataset folder; unpaired files are appended to `errors` (a list) naming the file.

    `splits` selects Cityscapes splits (default: every split present); GTA5 and SYNTHIA have the one split "all".
    """
    root = Path(root)
    errors = [] if errors is None else errors
    if layout == "gta5":
        pairs = _flat_pairs(root, "images", "labels", errors)
    elif layout == "synthia":
        pairs = _flat_pairs(root, "RGB", "GT/LABELS", errors)
    elif layout == "cityscapes":
        pairs = _cityscapes_pairs(root, cityscapes_splits(root) if splits is None else splits, errors)
    else:
        raise ValueError(f"unknown dataset layout {layout!r}; expected one of {LAYOUTS}")
    if splits is not None and layout != "cityscapes":
        wanted = set(splits)
        pairs = [p for p in pairs if p.split in wanted]
    return pairs


def read_label_ids(path: Path, layout: Layout) -> np.ndarray:
    """[H, W] label ids as the dataset stores them (before any train-id mapping); errors name the file."""
    if layout == "gta5":
        try:
            with Image.open(path) as img:
                if img.mode not in ("P", "L"):
                    raise DatasetError(f"{path}: GTA5 label has mode {img.mode}; expected a palette or grey PNG")
                return np.asarray(img)
        except (OSError, SyntaxError) as exc:
            raise DatasetError(f"{path}: cannot decode label PNG: {exc}") from exc
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise DatasetError(f"{path}: cannot decode label PNG")
    if layout == "synthia":
        if data.ndim != 3 or data.shape[2] < 3:
            raise DatasetError(f"{path}: SYNTHIA label has shape {data.shape}; expected 3 channels")
        return data[..., 2]  # cv2 gives BGR; the class id is the first channel in RGB order
    if data.ndim != 2:
        raise DatasetError(f"{path}: Cityscapes labelIds has shape {data.shape}; expected one channel")
    return data


_VALID_IDS: dict[str, frozenset[int]] = {
    "gta5": CITYSCAPES_VALID_IDS,
    "cityscapes": CITYSCAPES_VALID_IDS,
    "synthia": SYNTHIA_VALID_IDS,
}


@dataclass
class _PairResult:
    name: str
    errors: list[str]
    image_size: tuple[int, int] | None = None
    label_size: tuple[int, int] | None = None


def _check_pair(job: tuple[Pair, str, bool]) -> _PairResult:
    """Per-pair checks (runs in a worker process)."""
    pair, layout, pixels = job
    result = _PairResult(pair.name, [])
    try:
        iw, ih, _, _ = png_header(pair.image)
        lw, lh, _, _ = png_header(pair.label)
    except DatasetError as exc:
        result.errors.append(str(exc))
        return result
    result.image_size, result.label_size = (iw, ih), (lw, lh)
    if not pixels:
        return result
    image = cv2.imread(str(pair.image), cv2.IMREAD_COLOR)
    if image is None:
        result.errors.append(f"{pair.image}: cannot decode image PNG")
    try:
        ids = read_label_ids(pair.label, layout)  # type: ignore[arg-type]
    except DatasetError as exc:
        result.errors.append(str(exc))
        return result
    valid = _VALID_IDS[layout]
    bad = sorted(int(v) for v in np.unique(ids) if int(v) not in valid)
    if bad:
        result.errors.append(f"{pair.label}: label values {bad[:10]} are outside the {layout} class table")
    return result



def _one_thread() -> None:
    """Worker start: one OpenCV thread per process, as the processes already use every core."""
    cv2.setNumThreads(1)

def _run_checks(pairs: list[Pair], layout: str, cfg: VerifyConfig) -> list[_PairResult]:
    jobs = [(p, layout, cfg.check_pixels) for p in pairs]
    workers = cfg.workers or os.cpu_count() or 1
    bar = dict(total=len(jobs), desc=f"verify {layout}", unit="pair", disable=not cfg.progress)
    if workers == 1 or len(jobs) < 2:
        return [_check_pair(j) for j in tqdm(jobs, **bar)]
    # spawn, not fork: a caller that has run torch holds OpenMP threads a forked child would inherit locked
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_one_thread,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(_check_pair, jobs, chunksize=_CHUNKSIZE), **bar))


def verify_dataset(
    root: Path | str,
    layout: Layout,
    expected: dict[str, int] | None = None,
    cfg: VerifyConfig | None = None,
    known_mismatches: Iterable[str] = (),
) -> VerifyReport:
    """Check a dataset folder; returns a VerifyReport (call .raise_if_failed() to stop on errors).

    `expected` maps split -> number of pairs (e.g. {"train": 2975, "val": 500}); only those splits are
    checked (all splits when None). Image/label size mismatches are errors except for GTA5, where they
    are reported and logged, the `known_mismatches` among them named as known.
    """
    root, cfg = Path(root), cfg or VerifyConfig()
    report = VerifyReport(layout=layout, root=root, expected=dict(expected or {}))
    if not root.is_dir():
        report.errors.append(f"{root}: dataset folder missing")
        return report
    splits = list(expected) if expected else None
    pairs = list_pairs(root, layout, splits, report.errors)
    for split in splits or sorted({p.split for p in pairs}):
        report.counts[split] = sum(p.split == split for p in pairs)
    for split, n in report.expected.items():
        if report.counts.get(split, 0) != n:
            report.errors.append(
                f"{root}: split {split!r} has {report.counts.get(split, 0)} image/label pairs; expected {n}"
            )
    known = set(known_mismatches)
    by_name = {p.name: p for p in pairs}
    for res in _run_checks(pairs, layout, cfg):
        report.errors.extend(res.errors)
        if res.image_size is not None and res.label_size is not None and res.image_size != res.label_size:
            report.size_mismatches[res.name] = (res.image_size, res.label_size)
            if layout != "gta5":
                pair = by_name[res.name]
                report.errors.append(
                    f"{pair.label}: label is {res.label_size[0]}x{res.label_size[1]} but its image "
                    f"{pair.image.name} is {res.image_size[0]}x{res.image_size[1]}"
                )
    if layout == "gta5" and report.size_mismatches:
        report.known_mismatches = sorted(n for n in report.size_mismatches if n in known)
        new = sorted(n for n in report.size_mismatches if n not in known)
        log.warning(
            "GTA5 %s: %d image/label size mismatches (known: %s; not listed as known: %s); kept, and the "
            "resize stage resizes their labels to the image size",
            root,
            len(report.size_mismatches),
            ", ".join(report.known_mismatches) or "none",
            ", ".join(new) or "none",
        )
    log.info("verified %s (%s): pairs %s, %d errors", root, layout, report.counts, len(report.errors))
    return report
