"""Pre-resizing a dataset to the training scale, so training reads small files.

Each image is scaled so its short edge becomes `short_edge` (area or bilinear interpolation); its label is
scaled with nearest-neighbour to exactly the image's new size, which also settles GTA5's few frames whose
label size differs from the image (they are counted and logged). Files keep their formats (GTA5 palette
labels, SYNTHIA 16-bit labels, Cityscapes grey labelIds) and relative paths, so the same readers read the
output. Work is spread over worker processes; the output is written to a temporary folder next to the target
and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from plca.data.extract import COMPLETE_MARKER, replace_dir
from plca.data.verify import Layout, Pair, list_pairs
from plca.io import atomic_write, read_image_or, show_path, write_image

log = logging.getLogger(__name__)

_INTERPOLATION = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR}
# Pairs handed to a worker at a time (amortises inter-process overhead).
_CHUNKSIZE = 8


class ResizeError(ValueError):
    """A dataset cannot be resized (missing pairs, unreadable files)."""


@dataclass
class ResizeConfig:
    """Options of pre-resizing."""

    #: Target length of the short edge. 988 is the largest short edge the released PLCA code draws in its
    #: random resize ([760, 988]), so training from the resized files loses nothing.
    short_edge: int = 988
    #: Image interpolation; labels are always nearest-neighbour.
    interpolation: Literal["area", "bilinear"] = "area"
    #: Leave images whose short edge is already at most `short_edge` at their size (labels still follow them).
    upscale: bool = False
    #: Worker processes; 0 = one per CPU core, 1 = in this process.
    workers: int = 0
    #: PNG zlib level 0-9 (low = fast writes, larger files).
    png_compression: int = 1
    #: Show a progress bar.
    progress: bool = True


@dataclass
class ResizeParams(ResizeConfig):
    """The `resize` section of params.yaml: <in_dir>/<dataset> is resized into <out_dir>/<dataset>."""

    in_dir: Path = Path("data/raw")
    out_dir: Path = Path("data/resized")
    #: {dataset: [split, ...]} to resize only some splits (Cityscapes: train, val); absent = all splits.
    splits: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ResizeReport:
    """What a resize run wrote."""

    root: Path
    pairs: int = 0
    #: Frames whose label size differed from the image size before resizing (labels brought to the image size).
    label_size_fixed: list[str] = field(default_factory=list)


def target_size(width: int, height: int, short_edge: int, upscale: bool = False) -> tuple[int, int]:
    """(width, height) with the short edge scaled to `short_edge`, aspect ratio kept (rounded)."""
    short = min(width, height)
    if short <= short_edge and not upscale:
        return width, height
    scale = short_edge / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def _read_label(path: Path, layout: str) -> tuple[np.ndarray, list[int] | None]:
    """Label array as stored, and the palette of a palette PNG (GTA5) to write back."""
    if layout == "gta5":
        with Image.open(path) as img:
            if img.mode == "P":
                return np.asarray(img), img.getpalette()
            return np.asarray(img.convert("L")), None
    return _read_png(path, cv2.IMREAD_UNCHANGED, "label"), None


def _read_png(path: Path, flags: int, what: str) -> np.ndarray:
    return read_image_or(ResizeError, path, flags, what)


def _write_png(path: Path, data: np.ndarray, compression: int) -> None:
    """plca.io.write_image (any file name; cv2.imwrite's bytes), an array it cannot encode as ResizeError naming
    the file."""
    try:
        write_image(path, data, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    except ValueError as exc:  # "<path>: cannot encode an array of shape ..."
        raise ResizeError(str(exc)) from None


def _write_label(path: Path, data: np.ndarray, palette: list[int] | None, compression: int) -> None:
    if palette is not None:
        img = Image.fromarray(np.ascontiguousarray(data, dtype=np.uint8))  # mode L; a palette makes it P
        img.putpalette(palette)
        atomic_write(path, lambda f: img.save(f, format="PNG", compress_level=compression))
    else:
        _write_png(path, data, compression)



def _one_thread() -> None:
    """Worker start: one OpenCV thread per process, as the processes already use every core."""
    cv2.setNumThreads(1)

def _resize_pair(job: tuple[Pair, Path, Path, str, ResizeConfig]) -> tuple[str, bool]:
    """Resize one pair into the output tree (runs in a worker); returns (name, label size was fixed)."""
    pair, src_root, dst_root, layout, cfg = job
    image = _read_png(pair.image, cv2.IMREAD_COLOR, "image")
    label, palette = _read_label(pair.label, layout)
    h, w = image.shape[:2]
    fixed = label.shape[:2] != (h, w)
    new_w, new_h = target_size(w, h, cfg.short_edge, cfg.upscale)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=_INTERPOLATION[cfg.interpolation])
    if label.shape[:2] != (new_h, new_w):
        label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    out_image = dst_root / pair.image.relative_to(src_root)
    out_label = dst_root / pair.label.relative_to(src_root)
    out_image.parent.mkdir(parents=True, exist_ok=True)
    out_label.parent.mkdir(parents=True, exist_ok=True)
    _write_png(out_image, image, cfg.png_compression)
    _write_label(out_label, label, palette, cfg.png_compression)
    return pair.name, fixed


def resize_dataset(
    src: Path | str,
    dst: Path | str,
    layout: Layout,
    cfg: ResizeConfig | None = None,
    splits: list[str] | None = None,
) -> ResizeReport:
    """Resize every image/label pair of `src` (layout `layout`) into `dst`, same relative paths.

    `dst` appears only when complete (temporary folder `.<name>.resizing` next to it, then a rename);
    an existing `dst` is replaced.
    """
    src, dst, cfg = Path(src), Path(dst), cfg or ResizeConfig()
    if cfg.short_edge < 1:
        raise ValueError(f"short_edge must be positive, got {cfg.short_edge}")
    errors: list[str] = []
    pairs = list_pairs(src, layout, splits, errors)
    if errors:
        raise ResizeError(f"{show_path(src)}: cannot resize, the dataset is incomplete:\n  " + "\n  ".join(errors[:20]))
    if not pairs:
        raise ResizeError(f"{show_path(src)}: no image/label pairs found for layout {layout!r}")
    staging = dst.parent / f".{dst.name}.resizing"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    report = ResizeReport(root=dst)
    jobs = [(p, src, staging, layout, cfg) for p in pairs]
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    bar = dict(total=len(jobs), desc=f"resize {src.name}", unit="pair", disable=not cfg.progress)
    try:
        if workers == 1:
            results = [_resize_pair(j) for j in tqdm(jobs, **bar)]
        else:
            # spawn, not fork: a caller that has run torch holds OpenMP threads a forked child would inherit locked
            with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread,
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(tqdm(pool.map(_resize_pair, jobs, chunksize=_CHUNKSIZE), **bar))
        report.pairs = len(results)
        report.label_size_fixed = sorted(name for name, fixed in results if fixed)
        if report.label_size_fixed:
            log.warning(
                "%s: %d labels differed in size from their images and were resized to the image size: %s",
                show_path(src), len(report.label_size_fixed), ", ".join(map(show_path, report.label_size_fixed[:50])),
            )
        record = {"source": str(src), "layout": layout, "pairs": report.pairs, "short_edge": cfg.short_edge,
                  "interpolation": cfg.interpolation, "label_size_fixed": report.label_size_fixed}
        (staging / COMPLETE_MARKER).write_text(json.dumps(record, indent=2, sort_keys=True))
        replace_dir(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("resized %d pairs of %s into %s (short edge %d)", report.pairs, show_path(src), show_path(dst),
             cfg.short_edge)
    return report
