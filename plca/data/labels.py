"""Class tables: Cityscapes label ids -> train ids (from cityscapesscripts), SYNTHIA ids -> train ids,
the 19 / 16 / 13-class evaluation protocols and the Cityscapes palette.

Every dataset in this project is trained and evaluated in Cityscapes' 19 train ids; 255 is "ignore".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255

_TRAIN_LABELS = sorted((lab for lab in _CS_LABELS if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId)

#: The 19 Cityscapes train classes, in train-id order.
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)
NUM_CLASSES = len(CLASS_NAMES)

#: Cityscapes colours of the train classes, [19, 3] uint8 RGB.
PALETTE: np.ndarray = np.array([lab.color for lab in _TRAIN_LABELS], dtype=np.uint8)

#: Label id of each train id (what the official evaluator reads).
TRAINID_TO_ID: np.ndarray = np.array([lab.id for lab in _TRAIN_LABELS], dtype=np.uint8)

#: Cityscapes label ids that may appear in a labelIds PNG (0..33; -1 "license plate" cannot be stored in a PNG).
CITYSCAPES_VALID_IDS: frozenset[int] = frozenset(lab.id for lab in _CS_LABELS if lab.id >= 0)

# SYNTHIA RAND-CITYSCAPES class ids (first channel of its 16-bit label PNGs) -> Cityscapes train ids.
# 0 void, 13 parking-slot, 14 road-work and 22 lanemarking have no Cityscapes train class.
_SYNTHIA_TO_TRAINID: dict[int, int] = {
    3: 0,  # road
    4: 1,  # sidewalk
    2: 2,  # building
    21: 3,  # wall
    5: 4,  # fence
    7: 5,  # pole
    15: 6,  # traffic light
    9: 7,  # traffic sign
    6: 8,  # vegetation
    16: 9,  # terrain (not evaluated in the 16/13-class protocols, ignored in training below)
    1: 10,  # sky
    10: 11,  # pedestrian -> person
    17: 12,  # rider
    8: 13,  # car
    18: 14,  # truck (ignored)
    19: 15,  # bus
    20: 16,  # train (ignored)
    12: 17,  # motorcycle
    11: 18,  # bicycle
}
SYNTHIA_VALID_IDS: frozenset[int] = frozenset(range(23))

#: Train ids evaluated by each protocol: 19 (GTA5 -> Cityscapes), 16 and 13 (SYNTHIA -> Cityscapes, the
#: 13 drop wall, fence and pole).
PROTOCOLS: dict[int, tuple[int, ...]] = {
    19: tuple(range(19)),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    13: (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}


def _lut(pairs: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


#: 256-entry lookup tables: lut[label_id] = train id (255 = ignore).
CITYSCAPES_ID_TO_TRAINID: np.ndarray = _lut({lab.id: lab.trainId for lab in _CS_LABELS if lab.id >= 0})
SYNTHIA_ID_TO_TRAINID: np.ndarray = _lut(
    {k: v for k, v in _SYNTHIA_TO_TRAINID.items() if v in PROTOCOLS[16]}
)


class LabelError(ValueError):
    """A label map holds values that its dataset's class table does not know."""


def _check_ids(ids: np.ndarray, valid: frozenset[int], table: str, path: Path | str | None) -> None:
    present = np.unique(ids)
    bad = [int(v) for v in present if int(v) not in valid]
    if bad:
        where = f"{path}: " if path is not None else ""
        raise LabelError(
            f"{where}label ids {bad[:10]} are outside the {table} table (valid: {min(valid)}..{max(valid)})"
        )


def cityscapes_ids_to_train_ids(ids: np.ndarray, path: Path | str | None = None) -> np.ndarray:
    """Map a Cityscapes/GTA5 labelIds array to train ids; ids outside the table raise LabelError naming path."""
    _check_ids(ids, CITYSCAPES_VALID_IDS, "Cityscapes label-id", path)
    return CITYSCAPES_ID_TO_TRAINID[ids.astype(np.int64)]


def synthia_ids_to_train_ids(ids: np.ndarray, path: Path | str | None = None) -> np.ndarray:
    """Map SYNTHIA class ids to train ids (terrain, truck, train ignored); unknown ids raise LabelError."""
    _check_ids(ids, SYNTHIA_VALID_IDS, "SYNTHIA class-id", path)
    return SYNTHIA_ID_TO_TRAINID[ids.astype(np.int64)]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """[H, W] train ids -> [H, W, 3] uint8 RGB in the Cityscapes palette; ignore is black."""
    out = np.zeros((*train_ids.shape, 3), dtype=np.uint8)
    valid = train_ids < NUM_CLASSES
    out[valid] = PALETTE[train_ids[valid]]
    return out
