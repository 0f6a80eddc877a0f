"""Score Cityscapes label-id prediction PNGs against gtFine, agreeing exactly with the official evaluator.

    python -m plca.score PRED_DIR GT_DIR [--classes 19|16|13] [--json FILE]

GT_DIR is a `gtFine/<split>` folder (`<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`). PRED_DIR holds one
`<city>_<seq>_<frame>*.png` per ground-truth image, anywhere below it, with Cityscapes LABEL ids (0..33), as
`cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling` expects. Prints per-class IoU and mIoU in percent;
exit status 0 on success, 2 on bad input (message on stderr): a ground-truth image without its prediction, or
predictions that look like train ids (the evaluator would print a near-zero mIoU).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from plca.data.labels import (
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_VALID_IDS,
    CLASS_NAMES,
    NUM_CLASSES,
    PROTOCOLS,
    LabelError,
    cityscapes_ids_to_train_ids,
)
from plca.evaluation.metrics import PERCENT, ConfusionMatrix, iou, miou
from plca.io import atomic_write_json, show_path

GT_SUFFIX = "_gtFine_labelIds.png"
PRED_SUFFIX = ".png"
#: How many offending files an error lists before "...".
MAX_LISTED = 5

_MAX_LABEL_ID = max(CITYSCAPES_VALID_IDS)
_N_LABEL_IDS = _MAX_LABEL_ID + 1
# the counting below checks ids by their range only, which holds while every id in 0..33 is valid
if CITYSCAPES_VALID_IDS != frozenset(range(_N_LABEL_IDS)):
    raise ImportError("plca.score expects the Cityscapes label ids to be exactly 0..33")

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class ScoreError(ValueError):
    """Bad input to the scorer: missing, duplicate, unreadable or mismatching files."""


def _listing(paths: Sequence[Any]) -> str:
    shown = ", ".join(str(p) for p in paths[:MAX_LISTED])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > MAX_LISTED else "")


def find_ground_truth(gt_dir: str | Path) -> list[Path]:
    """The `<city>/*_gtFine_labelIds.png` files of a gtFine split folder, sorted."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise ScoreError(f"{gt_dir}: ground-truth folder not found")
    files = sorted(gt_dir.glob(f"*/*{GT_SUFFIX}"))
    if not files:
        raise ScoreError(f"{gt_dir}: no <city>/*{GT_SUFFIX} files (expected a Cityscapes gtFine/<split> folder)")
    return files


def frame_key(gt_file: Path) -> str:
    """`<city>_<seq>_<frame>` of a ground-truth file name (the prefix its prediction must start with)."""
    return gt_file.name[: -len(GT_SUFFIX)]


def match_predictions(pred_dir: str | Path, gt_files: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(prediction, ground truth) pairs: the one PNG anywhere under pred_dir whose name starts with each frame key.

    Same rule as the official evaluator (`<city>_<seq>_<frame>*.png`, searched recursively); predictions that
    match no ground truth are ignored, as there.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise ScoreError(f"{pred_dir}: prediction folder not found")
    keys = {frame_key(g): g for g in gt_files}
    key_lengths = sorted({len(k) for k in keys})
    found: dict[str, list[Path]] = {k: [] for k in keys}
    for root, _dirs, names in os.walk(pred_dir):
        for name in names:
            if not name.endswith(PRED_SUFFIX):
                continue
            for n in key_lengths:
                if name[:n] in keys:
                    found[name[:n]].append(Path(root) / name)
    missing = [keys[k] for k, preds in found.items() if not preds]
    if missing:
        raise ScoreError(f"no prediction in {pred_dir} for ground truth {_listing(missing)}")
    for k, preds in found.items():
        if len(preds) > 1:
            raise ScoreError(f"several predictions match ground truth {keys[k]}: {_listing(sorted(preds))}")
    return [(found[frame_key(g)][0], g) for g in gt_files]


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label PNG as a 2-D integer array (palette indices for mode P, as the evaluator reads)."""
    try:
        with Image.open(path) as img:
            arr = np.array(img)
    except Image.DecompressionBombError as exc:  # PIL refuses images of more than twice MAX_IMAGE_PIXELS
        raise ScoreError(f"{show_path(path)}: too large to be a label image ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ScoreError(f"{show_path(path)}: unreadable or corrupt PNG ({exc})") from exc
    if arr.ndim != 2:
        raise ScoreError(f"{show_path(path)}: expected a single-channel label-id image, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ScoreError(f"{show_path(path)}: expected integer label ids, got dtype {arr.dtype}")
    return arr


def _label_id_counts(pred_ids: np.ndarray, gt_ids: np.ndarray, pred_file: Path, gt_file: Path) -> np.ndarray:
    """[34, 34] pixel counts in label-id space (row = gt, column = prediction), as the evaluator builds them."""
    for ids, path in ((gt_ids, gt_file), (pred_ids, pred_file)):
        if int(ids.min()) < 0 or int(ids.max()) > _MAX_LABEL_ID:
            try:
                cityscapes_ids_to_train_ids(ids, path)  # raises, naming the unknown ids
            except LabelError as exc:
                raise ScoreError(str(exc)) from exc
            raise ScoreError(f"{path}: label ids outside 0..{_MAX_LABEL_ID}")
    n = _N_LABEL_IDS
    flat = np.bincount((gt_ids.astype(np.intp) * n + pred_ids).reshape(-1), minlength=n * n)
    return flat.reshape(n, n)


def _fold_to_train_ids(label_counts: np.ndarray) -> ConfusionMatrix:
    """Label-id counts -> train-id ConfusionMatrix: gt rows without a train id are dropped (ignored);
    prediction columns without one go to the "other" column."""
    train = CITYSCAPES_ID_TO_TRAINID[:_N_LABEL_IDS].astype(np.int64)
    rows = np.zeros((NUM_CLASSES, _N_LABEL_IDS), dtype=np.int64)
    cols = np.zeros((_N_LABEL_IDS, NUM_CLASSES + 1), dtype=np.int64)
    for label_id, t in enumerate(train):
        if t < NUM_CLASSES:
            rows[t, label_id] = 1
        cols[label_id, min(t, NUM_CLASSES)] = 1
    return ConfusionMatrix(NUM_CLASSES, rows @ label_counts @ cols)


#: Label ids that are no evaluated class (void ones, and those without a train id): a model's label-id prediction
#: rarely holds them, a train-id prediction read as label ids mostly does (road 0, sidewalk 1, building 2, ...).
_UNEVALUATED = np.asarray([i for i in range(_N_LABEL_IDS) if CITYSCAPES_ID_TO_TRAINID[i] >= NUM_CLASSES])
#: Share of predicted pixels on such ids, all ids <= 18, above which the predictions look like train ids.
TRAIN_ID_SHARE = 0.5


def check_not_train_ids(label_counts: np.ndarray, pred_dir: Path | str) -> None:
    """Stop when the predictions look like train ids (0..18) rather than label ids: every predicted value is at
    most 18 and most pixels fall on label ids that are no evaluated class. Scored as label ids, such files give a
    near-zero mIoU that looks like a result."""
    predicted = label_counts.sum(axis=0)
    total = int(predicted.sum())
    if total == 0 or predicted[NUM_CLASSES:].any():
        return
    share = float(predicted[_UNEVALUATED[_UNEVALUATED < NUM_CLASSES]].sum()) / total
    if share > TRAIN_ID_SHARE:
        raise ScoreError(
            f"{pred_dir}: the predictions look like train ids (0..18), not Cityscapes label ids: every value is at "
            f"most 18 and {share:.0%} of the pixels are on ids that are no evaluated class; convert them "
            "(plca.data.labels.TRAINID_TO_ID), or score the pipeline's eval/<variant>/s<seed>/labelIds/")


def confusion_from_pairs(pairs: Sequence[tuple[Path, Path]]) -> ConfusionMatrix:
    """The train-id confusion matrix of (prediction, ground truth) label-id PNG pairs; stops when they look like
    train ids (`check_not_train_ids`)."""
    # counted in label-id space first (one bincount per image, no lookups), folded to train ids once
    total = np.zeros((_N_LABEL_IDS, _N_LABEL_IDS), dtype=np.int64)
    for pred_file, gt_file in pairs:
        gt_ids = read_label_png(gt_file)
        pred_ids = read_label_png(pred_file)
        if pred_ids.shape != gt_ids.shape:
            raise ScoreError(
                f"{pred_file}: size {pred_ids.shape[1]}x{pred_ids.shape[0]} (WxH) differs from its ground truth "
                f"{gt_file} ({gt_ids.shape[1]}x{gt_ids.shape[0]})"
            )
        total += _label_id_counts(pred_ids, gt_ids, pred_file, gt_file)
    if pairs:
        check_not_train_ids(total, pairs[0][0].parent)
    return _fold_to_train_ids(total)


def score(pred_dir: str | Path, gt_dir: str | Path, classes: int = 19) -> tuple[dict[str, Any], ConfusionMatrix]:
    """Score a prediction folder: ({"mIoU", "IoU", "classes", "images"} in percent, the confusion matrix)."""
    if classes not in PROTOCOLS:
        raise ScoreError(f"unknown protocol {classes}; known: {sorted(PROTOCOLS)}")
    pairs = match_predictions(pred_dir, find_ground_truth(gt_dir))
    matrix = confusion_from_pairs(pairs)
    evaluated = PROTOCOLS[classes]
    values = iou(matrix, evaluated)
    mean = miou(matrix, evaluated)
    result = {
        "mIoU": None if np.isnan(mean) else mean * PERCENT,
        "IoU": {
            CLASS_NAMES[c]: None if np.isnan(v) else float(v) * PERCENT for c, v in zip(evaluated, values, strict=True)
        },
        "classes": classes,
        "images": len(pairs),
    }
    return result, matrix


def format_table(result: dict[str, Any]) -> str:
    """Per-class IoU and mIoU as a plain-text table (percent, two decimals; n/a where a class never occurs)."""

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    width = max(len(name) for name in result["IoU"])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {cell(v):>7}" for name, v in result["IoU"].items()]
    lines += ["-" * (width + 9), f"{'mIoU':<{width}}  {cell(result['mIoU']):>7}"]
    lines.append(f"({result['classes']} classes, {result['images']} images)")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write the result as JSON atomically (plca.io); a missing folder is an error, not created."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ScoreError(f"{path}: folder {path.parent} does not exist")
    try:
        atomic_write_json(result, path)
    except OSError as exc:
        raise ScoreError(f"{path}: cannot write ({exc})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plca.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("pred_dir", type=Path, help="folder of <city>_<seq>_<frame>*.png label-id predictions")
    parser.add_argument("gt_dir", type=Path, help="Cityscapes gtFine/<split> folder")
    parser.add_argument("--classes", type=int, choices=sorted(PROTOCOLS), default=19, help="evaluation protocol")
    parser.add_argument("--json", type=Path, default=None, help="write {mIoU, IoU, classes, images} here")
    args = parser.parse_args(argv)
    try:
        result, _ = score(args.pred_dir, args.gt_dir, args.classes)
        if args.json is not None:
            write_json(result, args.json)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
