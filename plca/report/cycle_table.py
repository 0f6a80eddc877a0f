"""reports/cycles.md: what PLCA's cycles pick on each variant's models, scored with target labels.

The figures come from plca/evaluation/cycles.py (the evaluate stage writes them into each run's metrics); this
module only averages them over seeds and lays them out. A diagnostic of the association, not a result table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from plca.report import atomic_write_text
from plca.report.config import Presentation
from plca.report.tables import NA, ResultsError, _markdown, _num, _Table

#: The per-level figures shown, in column order, with their headers.
LEVEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("positive_rate", "cycles closed"),
    ("cycle_right", "cycle label right"),
    ("classifier_right_at_cycle", "classifier right there"),
    ("corrects", "cycle right, classifier wrong"),
    ("misleads", "classifier right, cycle wrong"),
)
#: The levels of plca/evaluation/cycles.py, in column order.
LEVELS: tuple[str, ...] = ("features", "predictions")


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _field(cycles: Mapping[str, Any], path: tuple[str, ...], where: str) -> float | None:
    node: Any = cycles
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ResultsError(f"{where}: cycle figures lack {'.'.join(path)!r}")
        node = node[key]
    if node is not None and (isinstance(node, bool) or not isinstance(node, int | float)):
        raise ResultsError(f"{where}: cycle figure {'.'.join(path)!r} must be a number or null, got {node!r}")
    return None if node is None else float(node)


def cycle_table_markdown(records: Iterable[Mapping[str, Any]], *, dataset_label: str, show: Presentation) -> str:
    """Mean over seeds of each variant's cycle figures (rows in show's order, labelled by it); a page saying why
    when no record carries any."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    pairs: set[int] = set()
    for rec in records:
        if rec.get("cycles") is None:
            continue
        where = f"run {rec['variant']} seed {rec['seed']}"
        cycles = rec["cycles"]
        pairs.add(int(_field(cycles, ("pairs",), where) or 0))
        by_variant.setdefault(rec["variant"], []).append(cycles)
    if not by_variant:
        return _markdown([], "PLCA's cycles, scored with target labels", [
            f"No cycle figures for **{dataset_label}**: `evaluate.cycle_pairs` is 0, or the source domain has no "
            "val split to pair with target val (GTA5 and SYNTHIA have none)."])
    header = ["variant", "n seeds", "classifier right, all target cells"]
    header += [f"{level}: {title}" for level in LEVELS for _, title in LEVEL_COLUMNS]
    rows = []
    for v in show.order(by_variant):
        runs = by_variant[v]
        where = f"variant {v}"
        row = [show.label(v), str(len(runs)), _num(_mean([_field(c, ("classifier_right",), where) for c in runs]))]
        for level in LEVELS:
            row += [_num(_mean([_field(c, (level, key), where) for c in runs])) for key, _ in LEVEL_COLUMNS]
        rows.append(row)
    n_pairs = " / ".join(str(p) for p in sorted(pairs)) or NA
    intro = [
        f"Our models on **{dataset_label}**; mean over seeds, in % of cells of the feature grid.",
        f"Measured on {n_pairs} val pairs: source val image k with target val image k. The cycle is PLCA's "
        "(Eq. 2-3), on features (cosine) and on predictions (KL), with the target aggregated as in training "
        "(SAGG); target labels are used only to score, as training never sees them.",
        "cycles closed: labelled source cells whose cycle returns to a cell of their class (the cells the "
        "association loss trains on). The other columns count those cycles where the target cell they pick "
        "has a label: cycle label right = that cell's class is the source cell's; classifier right there = the "
        "model's own arg-max (no aggregation) is right on that cell.",
        "cycle right, classifier wrong: what the association could teach the classifier; classifier right, cycle "
        "wrong: what it could unteach. Their difference is cycle label right minus classifier right there.",
        "A diagnostic of the association, computed by the evaluate stage (`evaluate.cycle_pairs`); it changes no "
        "model and no mIoU.",
    ]
    table = _Table("", [], header, rows, "lr" + "r" * (1 + len(LEVELS) * len(LEVEL_COLUMNS)))
    return _markdown([table], "PLCA's cycles, scored with target labels", intro)


def write_cycle_table(
    records: Iterable[Mapping[str, Any]], path: Path | str, *, dataset_label: str, show: Presentation
) -> Path:
    """Write cycles.md atomically."""
    return atomic_write_text(path, cycle_table_markdown(records, dataset_label=dataset_label, show=show))
