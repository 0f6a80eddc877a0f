"""Confusion matrix, per-class IoU and mIoU with the Cityscapes evaluator's semantics.

The matrix is indexed by train ids: rows = ground truth (0..C-1), columns = prediction (0..C-1) plus one extra
"other" column C for predictions outside 0..C-1 (255, or a label id without a train id). Such a prediction is a
false negative of the true class and a false positive of no evaluated class, exactly as
`cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling` counts a prediction of e.g. "ego vehicle".

Units: `iou` and `miou` return fractions in [0, 1] (like the official evaluator); `summarize` returns percent,
the unit of every table and JSON file of this project.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plca.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, PROTOCOLS
from plca.io import atomic_write

#: Fractions -> percent for reports.
PERCENT = 100.0

#: Protocols reported by `summarize`: GTA5 -> Cityscapes (19) and SYNTHIA -> Cityscapes (16, 13).
SUMMARY_PROTOCOLS: tuple[int, ...] = (19, 16, 13)

ArrayLike = np.ndarray | torch.Tensor


class ConfusionMatrix:
    """Pixel counts [C, C + 1]: row = ground-truth train id, column = predicted train id or C ("other").

    `update` accumulates; `merge` / `+` combine matrices from several workers; `save` / `load` use .npy.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, counts: np.ndarray | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        shape = (num_classes, num_classes + 1)
        if counts is None:
            counts = np.zeros(shape, dtype=np.int64)
        else:
            counts = np.asarray(counts)
            if counts.shape != shape:
                raise ValueError(f"counts must have shape {shape} for {num_classes} classes, got {counts.shape}")
            if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
                raise ValueError("counts must be non-negative integers")
            counts = counts.astype(np.int64, copy=True)
        self.counts = counts

    @property
    def pixels(self) -> int:
        """Number of pixels counted (ignored ground truth excluded)."""
        return int(self.counts.sum())

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add one prediction / ground-truth pair of train ids (any equal shapes; gt 255 = ignore, skipped).

        Ground-truth values other than 0..C-1 and 255 raise ValueError: they mean the labels were not mapped
        to train ids. Predictions outside 0..C-1 go into the "other" column.
        """
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
        c = self.num_classes
        on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in (pred, gt))
        if on_device:
            self.counts += _bincount_torch(torch.as_tensor(pred), torch.as_tensor(gt), c)
        else:  # numpy's bincount is several times faster than torch's on CPU
            self.counts += _bincount_numpy(_to_numpy(pred), _to_numpy(gt), c)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the counts of both (e.g. from two data-loader workers or processes)."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge ConfusionMatrix with {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge matrices of {self.num_classes} and {other.num_classes} classes")
        return ConfusionMatrix(self.num_classes, self.counts + other.counts)

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def __radd__(self, other: Any) -> ConfusionMatrix:
        # lets the built-in sum() start from 0
        if isinstance(other, int) and other == 0:
            return ConfusionMatrix(self.num_classes, self.counts)
        return self.merge(other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return self.num_classes == other.num_classes and bool(np.array_equal(self.counts, other.counts))

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.pixels})"

    def iou(self, classes: Sequence[int] = PROTOCOLS[19]) -> np.ndarray:
        return iou(self, classes)

    def miou(self, classes: Sequence[int] = PROTOCOLS[19]) -> float:
        return miou(self, classes)

    def save(self, path: str | Path) -> None:
        """Write the counts as .npy atomically (plca.io.atomic_write)."""
        atomic_write(path, lambda f: np.save(f, self.counts))

    @classmethod
    def load(cls, path: str | Path) -> ConfusionMatrix:
        """Read a matrix written by `save`; a file of any other shape or type raises ValueError naming it."""
        path = Path(path)
        try:
            counts = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read a confusion matrix ({exc})") from exc
        if counts.ndim != 2 or counts.shape[1] != counts.shape[0] + 1:
            raise ValueError(f"{path}: expected a [C, C+1] confusion matrix, got shape {counts.shape}")
        try:
            return cls(counts.shape[0], counts)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _to_numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _bad_gt(num_classes: int) -> ValueError:
    return ValueError(
        f"ground truth holds values outside 0..{num_classes - 1} and {IGNORE_INDEX} (ignore): "
        "map label ids to train ids first"
    )


# Both versions avoid boolean masking (slow at 1024x2048): ignored gt goes to an extra row C that is dropped.
def _bincount_numpy(pred: np.ndarray, gt: np.ndarray, c: int) -> np.ndarray:
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must hold integer ids, got dtype {a.dtype}")
    g = gt.reshape(-1).astype(np.int64)  # astype copies: the caller's arrays are not touched
    p = pred.reshape(-1).astype(np.int64)
    # seen as unsigned, negatives are huge, so one minimum sends every value outside 0..C-1 to C
    np.minimum(g.view(np.uint64), c, out=g.view(np.uint64))
    np.minimum(p.view(np.uint64), c, out=p.view(np.uint64))
    flat = np.bincount(g * (c + 1) + p, minlength=(c + 1) * (c + 1))
    if flat[c * (c + 1) :].sum() != np.count_nonzero(gt == IGNORE_INDEX):
        raise _bad_gt(c)
    return flat[: c * (c + 1)].reshape(c, c + 1)


def _bincount_torch(pred: torch.Tensor, gt: torch.Tensor, c: int) -> np.ndarray:
    for name, t in (("prediction", pred), ("ground truth", gt)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got dtype {t.dtype}")
    g = gt.reshape(-1).long()
    p = pred.reshape(-1).long().to(g.device)
    ignored = g == IGNORE_INDEX
    if (((g < 0) | (g >= c)) & ~ignored).any():
        raise _bad_gt(c)
    g = torch.where(ignored, c, g)
    p = torch.where((p < 0) | (p >= c), c, p)
    flat = torch.bincount(g * (c + 1) + p, minlength=(c + 1) * (c + 1))
    return flat[: c * (c + 1)].reshape(c, c + 1).cpu().numpy().astype(np.int64)


def _counts(matrix: ConfusionMatrix | np.ndarray) -> np.ndarray:
    counts = matrix.counts if isinstance(matrix, ConfusionMatrix) else np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[1] not in (counts.shape[0], counts.shape[0] + 1):
        raise ValueError(f"expected a [C, C+1] or [C, C] confusion matrix, got shape {counts.shape}")
    return counts.astype(np.int64)


def _class_index(classes: Iterable[int], num_classes: int) -> np.ndarray:
    cls = np.asarray(list(classes), dtype=np.int64)
    if cls.size == 0 or len(set(cls.tolist())) != cls.size:
        raise ValueError(f"classes must be a non-empty list of distinct train ids, got {cls.tolist()}")
    if (cls < 0).any() or (cls >= num_classes).any():
        raise ValueError(f"classes {cls.tolist()} are outside 0..{num_classes - 1}")
    return cls


def iou(matrix: ConfusionMatrix | np.ndarray, classes: Sequence[int] = PROTOCOLS[19]) -> np.ndarray:
    """IoU of each class in `classes` (in that order), as fractions; nan where the class never occurs.

    As the Cityscapes evaluator, restricted to the evaluated classes: tp = M[c, c]; fn = row sum - tp (every
    column, so predictions of "other" or of non-evaluated classes are misses); fp = column c summed over the
    rows of the other evaluated classes (ground truth of non-evaluated classes is ignored).
    """
    counts = _counts(matrix)
    cls = _class_index(classes, counts.shape[0])
    tp = counts[cls, cls]
    fn = counts[cls].sum(axis=1) - tp
    fp = counts[np.ix_(cls, cls)].sum(axis=0) - tp
    denom = tp + fp + fn
    out = np.full(cls.size, np.nan)
    seen = denom > 0
    out[seen] = tp[seen] / denom[seen]
    return out


def miou(matrix: ConfusionMatrix | np.ndarray, classes: Sequence[int] = PROTOCOLS[19]) -> float:
    """Mean IoU over the classes that occur (nan-mean, as the evaluator's average), as a fraction."""
    values = iou(matrix, classes)
    seen = ~np.isnan(values)
    return float(values[seen].mean()) if seen.any() else float("nan")


def _percent_or_none(x: float) -> float | None:
    return None if np.isnan(x) else float(x) * PERCENT


def summarize(matrix: ConfusionMatrix | np.ndarray, protocols: Sequence[int] = SUMMARY_PROTOCOLS) -> dict[str, Any]:
    """JSON-friendly scores in percent (nan -> None) for a 19-class matrix:

    {"pixels": n, "mIoU": {"19": .., "16": .., "13": ..}, "IoU": {"19": {class name: ..}, "16": {...}, ...}}.
    Per-class IoU is given per protocol because the ignored ground truth (and hence fp) differs between them.
    """
    counts = _counts(matrix)
    if counts.shape[0] != NUM_CLASSES:
        raise ValueError(f"summarize needs a {NUM_CLASSES}-class matrix, got {counts.shape[0]} classes")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; known: {sorted(PROTOCOLS)}")
    out: dict[str, Any] = {"pixels": int(counts.sum()), "mIoU": {}, "IoU": {}}
    for p in protocols:
        classes = PROTOCOLS[p]
        values = iou(counts, classes)
        out["mIoU"][str(p)] = _percent_or_none(miou(counts, classes))
        out["IoU"][str(p)] = {CLASS_NAMES[c]: _percent_or_none(v) for c, v in zip(classes, values, strict=True)}
    return out
