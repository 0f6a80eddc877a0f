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
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from plca.data.labels import CITYSCAPES_VALID_IDS, SYNTHIA_VALID_IDS
from plca.io import read_image_or, show_path

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
# Pairs on which a checking process may die before verification stops (each costs a fresh process).
_MAX_CRASHES = _MAX_LISTED


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
            raise DatasetError(f"{show_path(self.root)}: {self.layout} dataset failed verification:\n  {listed}{more}")
        return self


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's header without decoding it; errors name the file."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_PNG_HEADER_BYTES)
    except OSError as exc:
        raise DatasetError(f"{show_path(path)}: cannot read: {exc}") from exc
    if len(head) < _PNG_HEADER_BYTES or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DatasetError(f"{show_path(path)}: not a PNG file (bad signature or header)")
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
            errors.append(f"{show_path(image)}: no matching label {show_path(label)}")
            continue
        pairs.append(Pair(split, name, image, label))
    return pairs


def _flat_pairs(root: Path, image_dir: str, label_dir: str, errors: list[str]) -> list[Pair]:
    images_root, labels_root = root / image_dir, root / label_dir
    for folder in (images_root, labels_root):
        if not folder.is_dir():
            errors.append(f"{show_path(folder)}: folder missing")
    if errors:
        return []
    pairs = _pairs_by_stem("all", images_root.glob("*.png"), labels_root, "{name}.png", ".png", errors)
    image_names = {p.stem for p in images_root.glob("*.png")}
    for label in sorted(labels_root.glob("*.png")):
        if label.stem not in image_names:
            errors.append(f"{show_path(label)}: no matching image in {show_path(images_root)}")
    return pairs


def _cityscapes_pairs(root: Path, splits: Iterable[str], errors: list[str]) -> list[Pair]:
    pairs: list[Pair] = []
    for split in splits:
        img_root, lab_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (img_root, lab_root):
            if not folder.is_dir():
                errors.append(f"{show_path(folder)}: folder missing")
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
                errors.append(f"{show_path(label)}: no matching image in {show_path(img_root)}")
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
                    raise DatasetError(
                        f"{show_path(path)}: GTA5 label has mode {img.mode}; expected a palette or grey PNG"
                    )
                return np.asarray(img)
        except (OSError, SyntaxError) as exc:
            raise DatasetError(f"{show_path(path)}: cannot decode label PNG: {exc}") from exc
    data = _read_png(path, cv2.IMREAD_UNCHANGED, "label")
    if layout == "synthia":
        if data.ndim != 3 or data.shape[2] < 3:
            raise DatasetError(f"{show_path(path)}: SYNTHIA label has shape {data.shape}; expected 3 channels")
        return data[..., 2]  # cv2 gives BGR; the class id is the first channel in RGB order
    if data.ndim != 2:
        raise DatasetError(f"{show_path(path)}: Cityscapes labelIds has shape {data.shape}; expected one channel")
    return data


def _read_png(path: Path, flags: int, what: str) -> np.ndarray:
    return read_image_or(DatasetError, path, flags, what)


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
    try:
        _read_png(pair.image, cv2.IMREAD_COLOR, "image")
    except DatasetError as exc:
        result.errors.append(str(exc))
    try:
        ids = read_label_ids(pair.label, layout)  # type: ignore[arg-type]
    except DatasetError as exc:
        result.errors.append(str(exc))
        return result
    valid = _VALID_IDS[layout]
    bad = sorted(int(v) for v in np.unique(ids) if int(v) not in valid)
    if bad:
        result.errors.append(
            f"{show_path(pair.label)}: label values {bad[:10]} are outside the {layout} class table"
        )
    return result


def _one_thread() -> None:
    """Worker start: one OpenCV thread per process, as the processes already use every core."""
    cv2.setNumThreads(1)


def _check_batch(jobs: list[tuple[Pair, str, bool]]) -> list[_PairResult]:
    """Per-pair checks of a batch of pairs: one task of a worker process."""
    return [_check_pair(job) for job in jobs]


def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: a caller that has run torch holds OpenMP threads a forked child would inherit locked
    return ProcessPoolExecutor(max_workers=workers, initializer=_one_thread,
                               mp_context=multiprocessing.get_context("spawn"))


def _run_checks(pairs: list[Pair], layout: str, cfg: VerifyConfig) -> list[_PairResult]:
    """`_check_pair` of every pair, in order: in this process (workers 1), or in worker processes, where a process
    that dies (a crash in a decoder, a kill) costs no more than the pair it was checking: that pair is named in
    its result's errors, and the other pairs are checked as usual."""
    jobs = [(p, layout, cfg.check_pixels) for p in pairs]
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(jobs), desc=f"verify {layout}", unit="pair", disable=not cfg.progress) as bar:
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(_check_pair(job))
                bar.update()
            return results
        batches = [jobs[i : i + _CHUNKSIZE] for i in range(0, len(jobs), _CHUNKSIZE)]
        done: dict[int, list[_PairResult]] = {}
        todo = deque(range(len(batches)))
        crashed: list[Pair] = []
        while todo:
            for b in _pool_round(batches, todo, done, workers, bar):
                done[b] = _isolate(batches[b], crashed)
                bar.update(len(batches[b]))
        return [res for b in range(len(batches)) for res in done[b]]


def _pool_round(batches: list[list[tuple[Pair, str, bool]]], todo: deque[int], done: dict[int, list[_PairResult]],
                workers: int, bar: tqdm) -> list[int]:
    """Check batches from `todo` in `workers` processes, into `done`, with at most one batch in flight per process
    so that a process that dies can have been checking one of those only. Returns [] once `todo` is empty, or, as
    soon as a process died, the batches that were in flight (the rest of `todo` is left for another round)."""
    with _pool(workers) as pool:
        running: dict[Future[list[_PairResult]], int] = {}
        while todo or running:
            while todo and len(running) < workers:
                b = todo.popleft()
                running[pool.submit(_check_batch, batches[b])] = b
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                if isinstance(fut.exception(), BrokenProcessPool):
                    broken = True
                    continue
                b = running.pop(fut)
                done[b] = fut.result()  # another exception is a bug in the checks: raised as it is
                bar.update(len(batches[b]))
            if broken:
                in_flight = []
                for fut, b in running.items():  # each ended with BrokenProcessPool, or finished just before
                    if isinstance(fut.exception(), BrokenProcessPool):
                        in_flight.append(b)
                    else:
                        done[b] = fut.result()
                        bar.update(len(batches[b]))
                return sorted(in_flight)
    return []


def _isolate(batch: list[tuple[Pair, str, bool]], crashed: list[Pair]) -> list[_PairResult]:
    """Check, one pair at a time in a process of their own, the pairs of a batch that was in flight when its
    process died: a pair on which the process dies again gets that as its error (and is added to `crashed`);
    DatasetError naming them once more than _MAX_CRASHES pairs have."""
    results = []
    pool = _pool(1)
    try:
        for job in batch:
            try:
                results.extend(pool.submit(_check_batch, [job]).result())
                continue
            except BrokenProcessPool:
                pool.shutdown()
                pool = _pool(1)
            pair = job[0]
            crashed.append(pair)
            if len(crashed) > _MAX_CRASHES:
                listed = "\n  ".join(f"{show_path(p.image)} / {show_path(p.label)}" for p in crashed)
                raise DatasetError(f"verification stopped: the checking process died on {len(crashed)} "
                                   f"image/label pairs:\n  {listed}")
            results.append(_PairResult(pair.name, [
                f"{show_path(pair.image)}: the process checking this image and its label {show_path(pair.label)} "
                "died (crashed or killed) while reading them"
            ]))
    finally:
        pool.shutdown()
    return results


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
        report.errors.append(f"{show_path(root)}: dataset folder missing")
        return report
    splits = list(expected) if expected else None
    pairs = list_pairs(root, layout, splits, report.errors)
    for split in splits or sorted({p.split for p in pairs}):
        report.counts[split] = sum(p.split == split for p in pairs)
    for split, n in report.expected.items():
        if report.counts.get(split, 0) != n:
            report.errors.append(
                f"{show_path(root)}: split {split!r} has {report.counts.get(split, 0)} image/label pairs; expected {n}"
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
                    f"{show_path(pair.label)}: label is {res.label_size[0]}x{res.label_size[1]} but its image "
                    f"{show_path(pair.image.name)} is {res.image_size[0]}x{res.image_size[1]}"
                )
    if layout == "gta5" and report.size_mismatches:
        report.known_mismatches = sorted(n for n in report.size_mismatches if n in known)
        new = sorted(n for n in report.size_mismatches if n not in known)
        log.warning(
            "GTA5 %s: %d image/label size mismatches (known: %s; not listed as known: %s); kept, and the "
            "resize stage resizes their labels to the image size",
            show_path(root),
            len(report.size_mismatches),
            ", ".join(map(show_path, report.known_mismatches)) or "none",
            ", ".join(map(show_path, new)) or "none",
        )
    log.info("verified %s (%s): pairs %s, %d errors", show_path(root), layout, report.counts, len(report.errors))
    return report
