"""The PLCA paper's published figures (Kang et al., NeurIPS 2020): Table 1 (ablation), Tables 2 and 3 (per class).

Facts only, typed in from the paper text; our reading of Table 1's lost column symbols follows
shared/spec/plca.md. All values are mIoU / IoU in percent on the Cityscapes val set, DeepLab-v2 ResNet-101.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from plca.data.labels import CLASS_NAMES, PROTOCOLS

GTAV = "GTAV→Cityscapes"
SYNTHIA = "SYNTHIA→Cityscapes"

#: The columns of the paper's Table 1 (one per ablation step), in its order. A variant names the one it is compared
#: with in params (`variants.<name>.show.paper`); the oracle is ours alone (the paper has no upper bound).
TABLE1_COLUMNS: tuple[str, ...] = (
    "source-only (CE)", "+ Lovász", "+ L_fass", "+ L_cass", "+ L_lsr = PLCA", "Sim-PLCA", "PLCA w/o SAGG",
)  # fmt: skip


def _table1(values: tuple[float, ...]) -> Mapping[str, float]:
    return MappingProxyType(dict(zip(TABLE1_COLUMNS, values, strict=True)))


#: Table 1, mIoU per column: GTAV over 19 classes, SYNTHIA over 16 classes.
TABLE1: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        GTAV: _table1((31.5, 34.3, 39.7, 47.4, 47.7, 41.8, 45.6)),
        SYNTHIA: _table1((35.4, 36.4, 40.9, 46.3, 46.8, 42.5, 44.6)),
    }
)

#: Number of classes each benchmark's Table 1 mIoU averages over.
TABLE1_PROTOCOL: Mapping[str, int] = MappingProxyType({GTAV: 19, SYNTHIA: 16})

#: The paper's column abbreviations in Tables 2 and 3, by Cityscapes class name.
CLASS_ABBREV: Mapping[str, str] = MappingProxyType(
    dict(
        zip(
            CLASS_NAMES,
            (
                "road", "side.", "build.", "wall", "fence", "pole", "light", "sign", "veg.", "terrain",
                "sky", "person", "rider", "car", "truck", "bus", "train", "motor", "bike",
            ),
            strict=True,
        )
    )
)  # fmt: skip


@dataclass(frozen=True)
class PaperRow:
    """One method's row of Table 2 or 3: per-class IoU of the evaluated classes and the published mIoUs."""

    benchmark: str
    method: str
    iou: Mapping[str, float]
    miou: float
    miou13: float | None = None
    #: classes the row averages over (train ids), i.e. the protocol of its benchmark
    protocol: tuple[int, ...] = field(default=PROTOCOLS[19])


def _row(benchmark: str, method: str, protocol: int, values: tuple[float, ...], miou: float,
         miou13: float | None = None) -> PaperRow:
    ids = PROTOCOLS[protocol]
    iou = MappingProxyType({CLASS_NAMES[i]: v for i, v in zip(ids, values, strict=True)})
    return PaperRow(benchmark, method, iou, miou, miou13, ids)


#: Table 2 (GTAV→Cityscapes, 19 classes), by the paper's row name. "Source Only" is the CE + Lovász model
#: (Table 1's "+ Lovász", 34.3).
TABLE2: Mapping[str, PaperRow] = MappingProxyType(
    {
        "Source Only": _row(
            GTAV, "Source Only", 19,
            (34.8, 14.9, 53.4, 15.7, 21.5, 29.7, 35.5, 18.4, 81.9, 13.1,
             70.4, 62.0, 34.4, 62.7, 21.6, 10.7, 0.7, 34.9, 35.7),
            34.3,
        ),
        "PLCA": _row(
            GTAV, "PLCA", 19,
            (84.0, 30.4, 82.4, 35.3, 24.8, 32.2, 36.8, 24.5, 85.5, 37.2,
             78.6, 66.9, 32.8, 85.5, 40.4, 48.0, 8.8, 29.8, 41.8),
            47.7,
        ),
    }
)  # fmt: skip

#: Table 3 (SYNTHIA→Cityscapes), by the paper's row name: mIoU over 16 classes, mIoU* over 13 (without wall,
#: fence, pole).
TABLE3: Mapping[str, PaperRow] = MappingProxyType(
    {
        "Source Only": _row(
            SYNTHIA, "Source Only", 16,
            (51.2, 21.8, 67.8, 8.2, 0.1, 26.2, 17.7, 17.3, 69.2, 67.1, 52.7, 22.8, 62.3, 31.6, 21.0, 46.1),
            36.4, 42.2,
        ),
        "PLCA": _row(
            SYNTHIA, "PLCA", 16,
            (82.6, 29.0, 81.0, 11.2, 0.2, 33.6, 24.9, 18.3, 82.8, 82.3, 62.1, 26.5, 85.6, 48.9, 26.8, 52.2),
            46.8, 54.0,
        ),
    }
)  # fmt: skip
