"""Readers of the real on-disk layouts of GTA5, Cityscapes and SYNTHIA RAND-CITYSCAPES.

A reader lists its files once, checks that every image has its label, and reads one (image, label) pair at a
time: the image as HxWx3 uint8 RGB, the label mapped to Cityscapes train ids (255 = ignore). The embedded domain
pair is written in the GTA5 and Cityscapes layouts, so the same readers serve it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from plca.data.labels import cityscapes_ids_to_train_ids, synthia_ids_to_train_ids
from plca.io import ImageError, read_image, show_path

log = logging.getLogger(__name__)

SizeMismatch = Literal["error", "resize_label"]

GTA5_LAYOUT = "images/NNNNN.png and labels/NNNNN.png"
CITYSCAPES_LAYOUT = (
    "leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"
)
SYNTHIA_LAYOUT = "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png"
CS_IMAGE_SUFFIX = "_leftImg8bit.png"
CS_LABEL_SUFFIX = "_gtFine_labelIds.png"
# How many missing files an error lists before it only counts them.
MAX_LISTED = 5


class DataError(ValueError):
    """A dataset file cannot be used: corrupt, wrong format, or not matching its partner file."""


@dataclass
class Sample:
    """One image with its label: image [H, W, 3] uint8 RGB, label [H, W] uint8 train ids (or None); soft_label
    [C, H, W] float32 class weights per pixel, zero where unlabelled (a soft pseudo-label set's, CRST's LRENT)."""

    image: np.ndarray
    label: np.ndarray | None
    name: str
    soft_label: np.ndarray | None = None


def _need_dir(path: Path, dataset: str, layout: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: folder {show_path(path)} not found; expected the layout {layout}")


def _listing(paths: list[Path], what: str) -> str:
    shown = ", ".join(show_path(p) for p in paths[:MAX_LISTED])
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return f"{len(paths)} {what}: {shown}{more}"


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as [H, W, 3] uint8 RGB; a missing, corrupt or truncated file raises naming it (any file
    name: plca.io.read_image never hands the name to OpenCV)."""
    if not path.is_file():
        raise FileNotFoundError(f"{show_path(path)}: image file not found")
    try:
        bgr = read_image(path, cv2.IMREAD_COLOR)
    except ImageError:
        raise DataError(f"{show_path(path)}: cannot decode the image (corrupt or truncated file?)") from None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label_png(path: Path) -> np.ndarray:
    """Read a label PNG without any colour conversion: palette PNGs give their indices, others their raw values.

    cv2 expands palette PNGs to colours, so this goes through Pillow (installed with matplotlib, scikit-image and
    cityscapesscripts); 16-bit and multi-channel PNGs keep their dtype and channels in RGB order.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{show_path(path)}: label file not found")
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L", "I;16", "I"):
                return np.array(img)
            mode = img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, zlib.error) as exc:
        raise DataError(f"{show_path(path)}: cannot decode the label PNG (corrupt or truncated file?): "
                        f"{show_path(str(exc))}") from None
    # Multi-channel (e.g. SYNTHIA's 16-bit RGB): Pillow cannot hold 16-bit RGB, cv2 can.
    try:
        raw = read_image(path, cv2.IMREAD_UNCHANGED)
    except ImageError:
        raise DataError(f"{show_path(path)}: cannot decode the label PNG (mode {mode})") from None
    if raw.ndim == 3:
        raw = raw[..., 2::-1] if raw.shape[2] >= 3 else raw
    return raw


def _read_list_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list file {show_path(path)} not found")
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            names.append(line[:-4] if line.endswith(".png") else line)
    if not names:
        raise DataError(f"{show_path(path)}: split list file is empty")
    return names


def _select(all_names: list[str], ids: Sequence[str] | Path | str | None, dataset: str,
            read: Callable[[Path], list[str]] = _read_list_file) -> list[str]:
    """Apply an optional subset (a sequence of names, or the path of a list file that `read` turns into names)."""
    if ids is None:
        return all_names
    if isinstance(ids, str | Path):
        source = f"list file {ids}"
        wanted = read(Path(ids))
    else:
        source = "the ids given"
        wanted = [str(i) for i in ids]
    present = set(all_names)
    missing = [n for n in wanted if n not in present]
    if missing:
        raise FileNotFoundError(f"{dataset}: {len(missing)} ids in {source} have no image, e.g. {missing[:MAX_LISTED]}")
    return wanted


class PairReader:
    """Shared logic: a list of (image, label) paths, size checks and label decoding per dataset."""

    dataset = "dataset"

    def __init__(
        self,
        names: list[str],
        image_paths: list[Path],
        label_paths: list[Path] | None,
        size_mismatch: SizeMismatch = "error",
    ) -> None:
        if size_mismatch not in ("error", "resize_label"):
            raise ValueError(f"size_mismatch must be 'error' or 'resize_label', got {size_mismatch!r}")
        self.names = names
        self.image_paths = image_paths
        self.label_paths = label_paths
        self.size_mismatch = size_mismatch
        if label_paths is not None:
            missing = [img for img, lab in zip(image_paths, label_paths, strict=True) if not lab.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.dataset}: {_listing(missing, 'images without their label file')} "
                    f"(e.g. {show_path(label_paths[image_paths.index(missing[0])])} is missing)"
                )

    def __len__(self) -> int:
        return len(self.names)

    def _train_ids(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def read_image(self, index: int) -> np.ndarray:
        return read_rgb(self.image_paths[index])

    def read(self, index: int) -> Sample:
        image = self.read_image(index)
        if self.label_paths is None:
            return Sample(image=image, label=None, name=self.names[index])
        label_path = self.label_paths[index]
        label = self._train_ids(label_path)
        if label.shape != image.shape[:2]:
            image_path = self.image_paths[index]
            what = (
                f"{self.dataset}: image {show_path(image_path)} is {image.shape[1]}x{image.shape[0]} (WxH) "
                f"but label {show_path(label_path)} is {label.shape[1]}x{label.shape[0]}"
            )
            if self.size_mismatch == "error":
                raise DataError(f"{what}; use size_mismatch='resize_label' to resize the label (nearest)")
            log.warning("%s; resizing the label (nearest)", what)
            h, w = image.shape[:2]
            label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        return Sample(image=image, label=label, name=self.names[index])


class FlatPairReader(PairReader):
    """A dataset with every image in one folder and its label, same file name, in another (GTA5, SYNTHIA)."""

    image_dir: str  # relative to root; set by each dataset
    label_dir: str
    layout: str  # the expected layout, quoted in errors

    def __init__(
        self, root: Path | str, ids: Sequence[str] | Path | str | None = None, size_mismatch: SizeMismatch = "error"
    ) -> None:
        root = Path(root)
        images, labels = root / self.image_dir, root / self.label_dir
        for folder in (root, images, labels):
            _need_dir(folder, self.dataset, self.layout)
        all_names = sorted(p.stem for p in images.glob("*.png"))
        if not all_names:
            raise FileNotFoundError(f"{self.dataset}: no PNG images in {show_path(images)}; expected {self.layout}")
        names = _select(all_names, ids, self.dataset)
        self.root = root
        super().__init__(
            names, [images / f"{n}.png" for n in names], [labels / f"{n}.png" for n in names], size_mismatch
        )


class GTA5Reader(FlatPairReader):
    """GTA5: `root/images/NNNNN.png`, `root/labels/NNNNN.png` (palette PNGs whose indices are label ids).

    ids: None for every image, a sequence of names ("00001"), or the path of a list file (one name a line,
    with or without ".png"), e.g. the embedded source's `split/train.txt`.
    """

    dataset = "GTA5"
    image_dir, label_dir, layout = "images", "labels", GTA5_LAYOUT

    def _train_ids(self, path: Path) -> np.ndarray:
        ids = read_label_png(path)
        if ids.ndim != 2:
            raise DataError(f"{show_path(path)}: expected a palette or single-channel label PNG, got shape {ids.shape}")
        return cityscapes_ids_to_train_ids(ids, show_path(path))


def cityscapes_list(path: Path) -> list[str]:
    """The image names of a Cityscapes list file, one a line: a name (`aachen_000000_000019`), its image file or a
    path to it; only a line's first field counts (the released CRST lists hold `<image path> <label path>`)."""
    names = []
    for line in _read_list_file(path):
        name = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
        names.append(name.removesuffix(".png").removesuffix(CS_IMAGE_SUFFIX.removesuffix(".png")))
    return names


class CityscapesReader(PairReader):
    """Cityscapes: `leftImg8bit/<split>/<city>/*_leftImg8bit.png` with `gtFine/<split>/<city>/*_gtFine_labelIds.png`.

    with_labels=False never looks at gtFine (adaptation never uses target labels; the test split has none).
    """

    dataset = "Cityscapes"

    def __init__(
        self, root: Path | str, split: str, with_labels: bool = True, size_mismatch: SizeMismatch = "error",
        ids: Sequence[str] | Path | str | None = None,
    ) -> None:
        """ids: None for the whole split, a sequence of names (`aachen_000000_000019`) or the path of a list file
        (see `cityscapes_list`); the split's order is kept."""
        root = Path(root)
        _need_dir(root, self.dataset, CITYSCAPES_LAYOUT)
        image_dir = root / "leftImg8bit" / split
        _need_dir(image_dir, self.dataset, CITYSCAPES_LAYOUT)
        image_paths = sorted(image_dir.glob(f"*/*{CS_IMAGE_SUFFIX}"))
        if not image_paths:
            raise FileNotFoundError(
                f"{self.dataset}: no *{CS_IMAGE_SUFFIX} images in {show_path(image_dir)}/<city>/; "
                f"expected {CITYSCAPES_LAYOUT}"
            )
        # an image named otherwise would be left out of every split without a word (and scored as if absent)
        stray = sorted(p for p in image_dir.glob("*/*.png") if not p.name.endswith(CS_IMAGE_SUFFIX))
        if stray:
            shown = ", ".join(show_path(p) for p in stray[:3])
            shown += f", ... ({len(stray)} in all)" if len(stray) > 3 else ""
            raise DataError(f"{self.dataset}: {shown}: not named <city>_<seq>_<frame>{CS_IMAGE_SUFFIX}; rename or "
                            f"move it out of {show_path(image_dir)}")
        names = [p.name[: -len(CS_IMAGE_SUFFIX)] for p in image_paths]
        if ids is not None:
            wanted = set(_select(names, ids, f"{self.dataset} split '{split}'", read=cityscapes_list))
            image_paths = [p for p, n in zip(image_paths, names, strict=True) if n in wanted]
            names = [n for n in names if n in wanted]
        label_paths = None
        if with_labels:
            label_dir = root / "gtFine" / split
            _need_dir(label_dir, self.dataset, CITYSCAPES_LAYOUT)
            label_paths = [
                label_dir / p.parent.name / f"{n}{CS_LABEL_SUFFIX}" for p, n in zip(image_paths, names, strict=True)
            ]
        self.root = root
        self.split = split
        super().__init__(names, image_paths, label_paths, size_mismatch)

    def _train_ids(self, path: Path) -> np.ndarray:
        ids = read_label_png(path)
        if ids.ndim != 2 or ids.dtype != np.uint8:
            raise DataError(
                f"{show_path(path)}: expected a single-channel 8-bit labelIds PNG, got {ids.dtype} {ids.shape}"
            )
        return cityscapes_ids_to_train_ids(ids, show_path(path))


class SynthiaReader(FlatPairReader):
    """SYNTHIA RAND-CITYSCAPES: `RGB/NNNNNNN.png`, `GT/LABELS/NNNNNNN.png` (16-bit, class id in the R channel)."""

    dataset = "SYNTHIA"
    image_dir, label_dir, layout = "RGB", "GT/LABELS", SYNTHIA_LAYOUT

    def _train_ids(self, path: Path) -> np.ndarray:
        raw = read_label_png(path)
        if raw.ndim != 3 or raw.shape[2] < 2:
            raise DataError(
                f"{show_path(path)}: expected a multi-channel SYNTHIA label PNG (class id first), got {raw.shape}"
            )
        return synthia_ids_to_train_ids(raw[..., 0], show_path(path))
