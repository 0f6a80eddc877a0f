"""The cycle diagnostics (plca/evaluation/cycles.py) and their report page (plca/report/cycle_table.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from plca.data.datasets import Sample
from plca.data.transforms import TransformConfig
from plca.evaluation.cycles import CycleConfig, cycle_diagnostics
from plca.models.output import FEATURES, LOGITS
from plca.params import load_params
from plca.report.config import Presentation
from plca.report.cycle_table import cycle_table_markdown, write_cycle_table
from plca.report.tables import ResultsError

_PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
SHOW = Presentation({name: v.show for name, v in _PARAMS.variants.items()}, _PARAMS.report)
C = 4
# raw pixel values reach the model: channel 0 of the image is the class id
RAW = TransformConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=255)
# an 8x8 block per grid cell: a 2x4 grid at output stride 8, each cell one class
SOURCE_CELLS = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
TARGET_CELLS = np.array([[1, 0, 3, 2], [2, 3, 0, 1]])


class ClassCodeModel(nn.Module):
    """Features: the one-hot class code of each 8x8 cell (cosine 1 within a class, 0 across). Logits: that code
    shifted by `shift` classes, so the classifier is right everywhere (0) or nowhere (1)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        code = F.avg_pool2d(x[:, :1], 8)[:, 0].round().long()
        features = F.one_hot(code, C).permute(0, 3, 1, 2).float()
        logits = 10.0 * F.one_hot((code + self.shift) % C, C).permute(0, 3, 1, 2).float()
        return {FEATURES: features, LOGITS: logits}


class ListReader:
    def __init__(self, cells: np.ndarray, n: int, root: str, label_map: dict[int, int] | None = None) -> None:
        self.root = Path(root)
        pixels = np.kron(cells, np.ones((8, 8), dtype=np.uint8)).astype(np.uint8)
        label = pixels.copy()
        for a, b in (label_map or {}).items():
            label[pixels == a] = b
        image = np.zeros((*pixels.shape, 3), np.uint8)
        image[..., 0] = pixels
        self.samples = [Sample(image, label, f"{root}_{i}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> Sample:
        return self.samples[i]


def _run(model: nn.Module, target: ListReader | None = None, pairs: int = 3) -> dict:
    source = ListReader(SOURCE_CELLS, 3, "src")
    target = ListReader(TARGET_CELLS, 3, "tgt") if target is None else target
    return cycle_diagnostics(model, source, target, RAW, CycleConfig(pairs=pairs, batch_size=2), torch.device("cpu"))


def test_cycles_on_class_codes_are_right_and_the_classifier_is_compared_at_the_same_cells() -> None:
    right = _run(ClassCodeModel(shift=0))
    assert right["pairs"] == 3
    assert right["classifier_right"] == pytest.approx(100.0)
    for level in ("features", "predictions"):
        r = right[level]
        assert r["positive_rate"] == pytest.approx(100.0)
        assert r["cycle_right"] == pytest.approx(100.0)
        assert r["classifier_right_at_cycle"] == pytest.approx(100.0)
        assert r["corrects"] == pytest.approx(0.0) and r["misleads"] == pytest.approx(0.0)
        # every source cell of a class picks the first of that class's identical target cells: 4 of 8
        assert r["chosen_per_target_cell"] == pytest.approx(0.5)

    wrong = _run(ClassCodeModel(shift=1))
    assert wrong["classifier_right"] == pytest.approx(0.0)
    f = wrong["features"]  # features still code the true class: the cycle knows what the classifier does not
    assert f["cycle_right"] == pytest.approx(100.0)
    assert f["classifier_right_at_cycle"] == pytest.approx(0.0)
    assert f["corrects"] == pytest.approx(100.0) and f["misleads"] == pytest.approx(0.0)


def test_target_labels_only_score_the_cycle() -> None:
    swapped = ListReader(TARGET_CELLS, 3, "tgt", label_map={1: 2, 2: 1})  # labels swapped, images unchanged
    r = _run(ClassCodeModel(shift=0), target=swapped)
    for level in ("features", "predictions"):
        assert r[level]["positive_rate"] == pytest.approx(100.0)  # the cycle never reads target labels
        assert r[level]["cycle_right"] == pytest.approx(50.0)  # classes 0 and 3 of 0..3 still land right
        assert r[level]["misleads"] == pytest.approx(0.0)
    assert r["classifier_right"] == pytest.approx(50.0)


def test_pairs_are_capped_by_the_shorter_val_list_and_ignored_target_cells_are_not_scored() -> None:
    target = ListReader(TARGET_CELLS, 2, "tgt", label_map={0: 255})
    r = _run(ClassCodeModel(shift=0), target=target, pairs=10)
    assert r["pairs"] == 2
    assert r["features"]["cycle_right"] == pytest.approx(100.0)  # class-0 cycles land on ignored cells
    assert r["features"]["positive_rate"] == pytest.approx(100.0)


def test_errors_name_the_problem() -> None:
    empty = ListReader(TARGET_CELLS, 0, "tgt")
    with pytest.raises(ValueError, match="at least one val pair"):
        _run(ClassCodeModel(), target=empty)
    unlabelled = ListReader(TARGET_CELLS, 3, "tgt")
    unlabelled.samples = [Sample(s.image, None, s.name) for s in unlabelled.samples]
    with pytest.raises(ValueError, match=r"tgt: cycle diagnostics need labels, but item tgt_0 has none"):
        _run(ClassCodeModel(), target=unlabelled)


def _record(variant: str, seed: int, positive: float | None) -> dict:
    level = {"positive_rate": positive, "cycle_right": 80.0, "classifier_right_at_cycle": 75.0, "corrects": 10.0,
             "misleads": 5.0, "chosen_per_target_cell": 0.4}
    return {"variant": variant, "seed": seed,
            "cycles": {"pairs": 100, "classifier_right": 66.0, "features": level, "predictions": dict(level)}}


def test_cycle_table_averages_seeds_in_params_order(tmp_path: Path) -> None:
    records = [_record("plca", 0, 70.0), _record("plca", 1, 80.0), _record("source_only", 0, 60.0),
               {"variant": "oracle", "seed": 0}]  # a run without cycle figures is left out
    path = write_cycle_table(records, tmp_path / "cycles.md", dataset_label="toy pair", show=SHOW)
    text = path.read_text()
    assert "**toy pair**" in text and "100 val pairs" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "seeds" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| source-only (CE + Lovász)", "| PLCA (+ L_lsr)"]
    assert rows[1].split(" | ")[1:4] == ["2", "66.0", "75.0"]  # n seeds, classifier right, mean positive rate
    assert "oracle" not in text


def test_cycle_table_without_figures_says_why_and_bad_figures_are_named(tmp_path: Path) -> None:
    text = cycle_table_markdown([{"variant": "plca", "seed": 0}], dataset_label="toy pair", show=SHOW)
    assert "`evaluate.cycle_pairs` is 0" in text and "|" not in text
    bad = _record("plca", 0, 70.0)
    del bad["cycles"]["features"]["cycle_right"]
    with pytest.raises(ResultsError, match="variant plca: cycle figures lack 'features.cycle_right'"):
        cycle_table_markdown([bad], dataset_label="toy pair", show=SHOW)
    bad = _record("plca", 0, 70.0)
    bad["cycles"]["predictions"]["misleads"] = "many"
    with pytest.raises(ResultsError, match="'predictions.misleads' must be a number or null, got 'many'"):
        cycle_table_markdown([bad], dataset_label="toy pair", show=SHOW)
