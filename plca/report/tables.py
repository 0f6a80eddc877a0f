"""Per-run metrics -> reports/results.csv, and results -> Table 1 (ablation) and Tables 2/3 (per class), in
markdown and LaTeX (booktabs).

Our figures are mean +- std over seeds (std with ddof=1); gains over the baseline are paired by seed. The
paper's published figures sit in separate columns / rows whose labels start with "paper", other methods' published
figures (params `variants.<name>.show.published`) in Table 2's columns whose labels start with "published", with
their sources listed under it; our numbers are labelled only with the caller's dataset_label, never with a
benchmark name. Which variant is a row of which
table, its label and the baseline come from the caller's `Presentation` (params `variants.*.show`, `report`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from plca.data.labels import CLASS_NAMES, PROTOCOLS
from plca.report import atomic_write, atomic_write_text
from plca.report.config import Presentation
from plca.report.paper import CLASS_ABBREV, GTAV, SYNTHIA, TABLE1, TABLE1_PROTOCOL, TABLE2, TABLE3

#: results.csv columns, fixed by the report contract.
RESULT_COLUMNS: tuple[str, ...] = ("variant", "seed", "miou", *CLASS_NAMES)

#: Optional per-run column: mIoU on the source domain's val set (shows the domain gap).
SOURCE_VAL = "source_val_miou"

#: Optional per-run column: target mIoU of a model scored with test-time aggregation, scored without it.
WITHOUT_TTA = "miou_without_tta"

#: The optional per-run columns, in results.csv order.
EXTRA_COLUMNS: tuple[str, ...] = (SOURCE_VAL, WITHOUT_TTA)

#: Shown for a missing or undefined number.
NA = "–"

#: Decimals in the tables: the paper reports one.
DIGITS = 1


class ResultsError(ValueError):
    """Per-run results are malformed (missing key, wrong type, duplicate run, value out of range)."""


# ---------------------------------------------------------------------------------------------- results.csv


def _number(value: Any, what: str, where: str, allow_nan: bool) -> float:
    if value is None and allow_nan:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ResultsError(f"{where}: {what} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        if allow_nan:
            return value
        raise ResultsError(f"{where}: {what} is NaN")
    if not 0.0 <= value <= 100.0:
        raise ResultsError(f"{where}: {what} = {value} is not a percentage in [0, 100]")
    return value


def _sorted(frame: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """Rows by variant (those in `order` first, in its order, then the others as they first appear), then seed."""
    frame = frame.reset_index(drop=True)
    present = list(dict.fromkeys(frame["variant"]))
    first = [v for v in dict.fromkeys(order) if v in set(present)]
    rank = {v: i for i, v in enumerate([*first, *(v for v in present if v not in first)])}
    order = frame.assign(_rank=frame["variant"].map(rank)).sort_values(["_rank", "seed"], kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def results_frame(
    records: Iterable[Mapping[str, Any]], where: str = "results", order: Sequence[str] = ()
) -> pd.DataFrame:
    """Per-run records -> the results DataFrame: columns RESULT_COLUMNS (+ each of EXTRA_COLUMNS any record has).

    A record is {"variant": str, "seed": int, "miou": percent, "iou": {class name: percent or None}, ...};
    "iou" must name exactly the 19 classes (None/NaN for classes absent from the evaluation set). Other keys
    (e.g. miou16, miou13: derivable from "iou") are ignored. Rows come ordered by variant (those in `order`
    first, in its order, then the others as they first appear), then seed.
    """
    rows = []
    seen: set[tuple[str, int]] = set()
    for k, rec in enumerate(records):
        at = f"{where}: record {k}"
        for key in ("variant", "seed", "miou", "iou"):
            if key not in rec:
                raise ResultsError(f"{at}: missing key {key!r} (has {sorted(rec)})")
        variant, seed = rec["variant"], rec["seed"]
        if not isinstance(variant, str) or not variant:
            raise ResultsError(f"{at}: variant must be a non-empty string, got {variant!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ResultsError(f"{at}: seed must be an integer, got {seed!r}")
        at = f"{where}: run {variant} seed {seed}"
        if (variant, int(seed)) in seen:
            raise ResultsError(f"{at}: appears twice")
        seen.add((variant, int(seed)))
        iou = rec["iou"]
        if not isinstance(iou, Mapping):
            raise ResultsError(f"{at}: 'iou' must map class names to IoU, got {type(iou).__name__}")
        unknown = sorted(set(iou) - set(CLASS_NAMES))
        missing = [c for c in CLASS_NAMES if c not in iou]
        if unknown or missing:
            raise ResultsError(f"{at}: 'iou' class names wrong: unknown {unknown}, missing {missing}")
        row: dict[str, Any] = {"variant": variant, "seed": int(seed), "miou": _number(rec["miou"], "miou", at, False)}
        row.update({c: _number(iou[c], f"IoU of {c!r}", at, True) for c in CLASS_NAMES})
        for extra in EXTRA_COLUMNS:
            if rec.get(extra) is not None:
                row[extra] = _number(rec[extra], extra, at, True)
        rows.append(row)
    if not rows:
        raise ResultsError(f"{where}: no runs")
    frame = pd.DataFrame(rows)
    columns = list(RESULT_COLUMNS) + [c for c in EXTRA_COLUMNS if c in frame]
    frame = frame.reindex(columns=columns)
    frame["seed"] = frame["seed"].astype(np.int64)
    return _sorted(frame, order)


def record_from_summary(
    variant: str, seed: int, summary: Mapping[str, Any], source_val_miou: float | None = None
) -> dict[str, Any]:
    """A results record from `plca.evaluation.metrics.summarize` output (its 19-class mIoU and per-class IoU)."""
    try:
        record = {"variant": variant, "seed": seed, "miou": summary["mIoU"]["19"], "iou": summary["IoU"]["19"]}
    except (KeyError, TypeError) as exc:
        raise ResultsError(f"run {variant} seed {seed}: summary lacks 19-class mIoU / IoU ({exc!r})") from exc
    if source_val_miou is not None:
        record[SOURCE_VAL] = source_val_miou
    return record


def check_results(frame: pd.DataFrame, where: str = "results", order: Sequence[str] = ()) -> pd.DataFrame:
    """Validate a results DataFrame (columns, types, ranges, unique runs); returns it ordered by variant (as
    `results_frame` orders them), then seed."""
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(f"{where}: missing columns {missing}")
    if frame.empty:
        raise ResultsError(f"{where}: no runs")
    if frame["variant"].isna().any() or not all(isinstance(v, str) and v for v in frame["variant"]):
        raise ResultsError(f"{where}: every row needs a non-empty variant name")
    if not pd.api.types.is_integer_dtype(frame["seed"]):
        raise ResultsError(f"{where}: seed column must hold integers, got dtype {frame['seed'].dtype}")
    numeric = ["miou", *CLASS_NAMES] + [c for c in EXTRA_COLUMNS if c in frame]
    for col in numeric:
        if not pd.api.types.is_numeric_dtype(frame[col]):
            raise ResultsError(f"{where}: column {col!r} must be numeric, got dtype {frame[col].dtype}")
        values = frame[col].to_numpy(dtype=float)
        bad = ~np.isnan(values) & ((values < 0) | (values > 100))
        if bad.any():
            raise ResultsError(f"{where}: column {col!r} holds values outside [0, 100]: {values[bad][:5].tolist()}")
    if frame["miou"].isna().any():
        raise ResultsError(f"{where}: miou is missing for runs {frame.loc[frame['miou'].isna(), 'variant'].tolist()}")
    dup = frame.duplicated(["variant", "seed"])
    if dup.any():
        raise ResultsError(f"{where}: duplicate runs {frame.loc[dup, ['variant', 'seed']].values.tolist()}")
    return _sorted(frame, order)


def _as_frame(results: pd.DataFrame | Iterable[Mapping[str, Any]], where: str) -> pd.DataFrame:
    if isinstance(results, pd.DataFrame):
        return check_results(results, where)
    return results_frame(results, where)


def write_results_csv(results: pd.DataFrame | Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Write results.csv atomically: columns variant, seed, miou, then the 19 classes in train-id order; rows
    ordered by variant as given (the report stage: params order), then seed; an empty cell is a class absent from
    the evaluation set."""
    frame = _as_frame(results, str(path))[list(RESULT_COLUMNS)]
    return atomic_write(path, lambda f: frame.to_csv(f, index=False, lineterminator="\n"))


def read_results_csv(path: Path | str) -> pd.DataFrame:
    """Read and validate results.csv; a wrong header or value raises ResultsError naming the file."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"variant": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise ResultsError(f"{path}: not a results CSV ({exc})") from exc
    if tuple(frame.columns) != RESULT_COLUMNS:
        raise ResultsError(f"{path}: header must be {list(RESULT_COLUMNS)}, got {list(frame.columns)}")
    return check_results(frame, str(path))


# ---------------------------------------------------------------------------------------------- statistics


def protocol_miou(results: pd.DataFrame, n_classes: int) -> pd.Series:
    """Per run, mean IoU over the classes of the 16- or 19-class (or 13) protocol, skipping absent classes."""
    if n_classes not in PROTOCOLS:
        raise ValueError(f"no {n_classes}-class protocol; known: {sorted(PROTOCOLS)}")
    cols = [CLASS_NAMES[i] for i in PROTOCOLS[n_classes]]
    return results[cols].mean(axis=1, skipna=True)


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


@dataclass(frozen=True)
class VariantSummary:
    """One variant's mIoU over seeds, and its gain over the baseline paired by seed."""

    variant: str
    seeds: tuple[int, ...]
    miou: tuple[float, ...]
    mean: float
    std: float
    gain_mean: float = math.nan
    gain_std: float = math.nan
    gain_seeds: tuple[int, ...] = ()
    #: the variant the gain is paired against (the report's baseline, or the row's own)
    gain_vs: str = ""
    source_val_mean: float = math.nan
    source_val_std: float = math.nan
    #: the same models scored without test-time aggregation (variants scored with it only), and the paired gain
    without_tta_mean: float = math.nan
    without_tta_std: float = math.nan
    without_tta_gain_mean: float = math.nan
    without_tta_gain_std: float = math.nan
    #: IoU per class name, mean over seeds (NaN for a class absent from the evaluation set)
    per_class: Mapping[str, float] = field(default_factory=dict)
    #: mean over seeds of each run's mIoU over the 16- and 13-class protocols
    miou16: float = math.nan
    miou13: float = math.nan


def _paired_differences(values: pd.Series, base: pd.Series) -> tuple[list[int], np.ndarray]:
    """Seeds both series (indexed by seed) have, and values - base on those seeds."""
    common = sorted(set(values.index) & set(base.index))
    return common, (values[common] - base[common]).to_numpy(dtype=float)


def _by_seed(rows: pd.DataFrame, column: str) -> pd.Series:
    """An optional column's values indexed by seed, the missing ones dropped (empty when the column is absent)."""
    if column not in rows:
        return pd.Series(dtype=float)
    return rows.set_index("seed")[column].dropna()


def summarize(results: pd.DataFrame, baseline: str, baselines: Mapping[str, str] | None = None
              ) -> dict[str, VariantSummary]:
    """Mean and std (ddof=1) of mIoU over seeds per variant (in the results' order), per-class means over seeds,
    and the gain over baseline: mean and std of the per-seed differences over the seeds both variants ran.
    `baselines`: variant -> its own baseline, for the variants paired against another one (`gain_vs`)."""
    results = check_results(results)
    out = {}
    for variant in dict.fromkeys(results["variant"]):
        own = (baselines or {}).get(variant, baseline)
        base = results[results["variant"] == own].set_index("seed")["miou"]
        rows = results[results["variant"] == variant]
        miou = rows["miou"].to_numpy(dtype=float)
        gain: dict[str, Any] = {"gain_vs": own}
        if variant != own:
            common, diffs = _paired_differences(rows.set_index("seed")["miou"], base)
            if common:
                gain.update(gain_mean=float(diffs.mean()), gain_std=_std(diffs), gain_seeds=tuple(common))
        source_val = _by_seed(rows, SOURCE_VAL)
        if len(source_val):
            gain.update(source_val_mean=float(source_val.mean()), source_val_std=_std(source_val.to_numpy(dtype=float)))
        plain = _by_seed(rows, WITHOUT_TTA)
        if len(plain):
            gain.update(without_tta_mean=float(plain.mean()), without_tta_std=_std(plain.to_numpy(dtype=float)))
            common, diffs = _paired_differences(plain, base)
            if common and variant != own:
                gain.update(without_tta_gain_mean=float(diffs.mean()), without_tta_gain_std=_std(diffs))
        out[variant] = VariantSummary(
            variant=variant,
            seeds=tuple(int(s) for s in rows["seed"]),
            miou=tuple(float(m) for m in miou),
            mean=float(miou.mean()),
            std=_std(miou),
            per_class={c: float(rows[c].mean()) for c in CLASS_NAMES},
            miou16=float(protocol_miou(rows, 16).mean()),
            miou13=float(protocol_miou(rows, 13).mean()),
            **gain,
        )
    return out


def headline(results: pd.DataFrame, show: Presentation) -> str:
    """One sentence: the headline variant vs the baseline (show.roles), mean +- std over seeds and the paired gain
    (for READMEs and notes)."""
    variant, baseline = show.roles.headline, show.roles.baseline
    if variant is None:
        raise ValueError("no headline variant (params report.headline is null)")
    summary = summarize(results, baseline)
    for name in (variant, baseline):
        if name not in summary:
            raise ResultsError(f"results: no runs of {name!r} (have {list(summary)})")
    v, b = summary[variant], summary[baseline]
    label = show.label
    return (
        f"{label(variant)}: {_mean_std(v.mean, v.std)} mIoU vs {label(baseline)}: {_mean_std(b.mean, b.std)} "
        f"(mean ± std over seeds); paired gain {_mean_std(v.gain_mean, v.gain_std, signed=True)} "
        f"over {len(v.gain_seeds)} seeds."
    )


# ---------------------------------------------------------------------------------------------- rendering


def _num(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return NA
    return f"{x:+.{DIGITS}f}" if signed else f"{x:.{DIGITS}f}"


def _mean_std(mean: float, std: float, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return NA
    return f"{_num(mean, signed)} ± {_num(std)}"


@dataclass
class _Table:
    """A rendered-agnostic table: title, explanatory lines, header and rows of plain (unicode) strings."""

    title: str
    notes: list[str]
    header: list[str]
    rows: list[list[str]]
    #: LaTeX column alignment, one letter per column
    align: str = ""
    #: row indices before which a rule separates groups (ours / paper)
    rules: list[int] = field(default_factory=list)


def _md_cell(text: str) -> str:
    # '|' splits cells and '*' may start emphasis; escape both
    return text.replace("|", "\\|").replace("*", "\\*")


def _markdown(
    tables: Sequence[_Table], heading: str, intro: Sequence[str], footer: tuple[str, Sequence[str]] | None = None
) -> str:
    """footer: (title, bullet lines) of a section under the last table (none when there are no lines)."""
    lines = [f"# {heading}", ""]
    lines += [*(f"- {line}" for line in intro), ""] if intro else []
    for t in tables:
        lines += [f"## {t.title}", ""] if t.title else []
        lines += [*(f"- {n}" for n in t.notes), ""] if t.notes else []
        lines.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
        lines.append("|" + "|".join("---" if a == "l" else "---:" for a in t.align) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        lines.append("")
    if footer is not None and footer[1]:
        lines += [f"## {footer[0]}", "", *(f"- {line}" for line in footer[1]), ""]
    return "\n".join(lines)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "→": r"$\rightarrow$",
    "–": "--",
    "Δ": r"$\Delta$",
    "á": r"\'{a}",
    "é": r"\'{e}",
    "è": r"\`{e}",
    "ü": r"\"{u}",
    "ö": r"\"{o}",
    "—": "---",
    "≈": r"$\approx$",
    "×": r"$\times$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters and spell the few unicode symbols the tables use as LaTeX."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex(tables: Sequence[_Table], caption: str, label: str, footer: Sequence[str] = ()) -> str:
    """footer: notes under the last table, one paragraph each."""
    lines = [
        "% Generated by plca.report.tables; needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        "\\scriptsize",
        f"\\caption{{{latex_escape(caption)}}}",
        f"\\label{{{label}}}",
    ]
    for k, t in enumerate(tables):
        if k:
            lines.append("\\medskip")
        if t.title:
            lines.append(f"\\par\\textbf{{{latex_escape(t.title)}}}\\par\\smallskip")
        lines += [f"\\begin{{tabular}}{{{t.align}}}", "\\toprule"]
        lines.append(" & ".join(latex_escape(h) for h in t.header) + " \\\\")
        lines.append("\\midrule")
        for i, row in enumerate(t.rows):
            if i in t.rules:
                lines.append("\\midrule")
            lines.append(" & ".join(latex_escape(c) for c in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        lines += [f"\\par\\smallskip {latex_escape(n)}" for n in t.notes]
    lines += [f"\\par\\smallskip {latex_escape(n)}" for n in footer]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- Table 1


def _rows(summary: Mapping[str, VariantSummary], show: Presentation, table: str) -> dict[str, VariantSummary]:
    """The summaries of the variants that are rows of `table` (params `variants.<name>.show.tables`)."""
    return {v: s for v, s in summary.items() if show.in_table(v, table)}


def _table1(results: pd.DataFrame, dataset_label: str, show: Presentation) -> tuple[_Table, list[str]]:
    baseline, label = show.roles.baseline, show.label
    # gains are paired against the baseline's runs whether or not the baseline is a row
    summary = _rows(summarize(results, baseline), show, "table1")
    with_source_val = any(math.isfinite(s.source_val_mean) for s in summary.values())
    header = ["variant", "paper column", "n seeds", "ours: mIoU", "ours: per seed", f"ours: Δ vs {label(baseline)}"]
    header += ["ours: source val mIoU"] if with_source_val else []
    with_plain = any(math.isfinite(s.without_tta_mean) for s in summary.values())
    header += ["ours: mIoU without test-time aggregation (Δ)"] if with_plain else []
    header += [f"paper {b} ({TABLE1_PROTOCOL[b]} classes)" for b in (GTAV, SYNTHIA)]
    rows = []
    for v, s in summary.items():
        paper = show.paper(v)
        row = [
            label(v),
            NA if paper is None else paper,
            str(len(s.seeds)),
            _mean_std(s.mean, s.std),
            " / ".join(_num(m) for m in s.miou),
            "reference" if v == baseline else _mean_std(s.gain_mean, s.gain_std, signed=True),
        ]
        row += [_mean_std(s.source_val_mean, s.source_val_std)] if with_source_val else []
        if with_plain:
            plain = f"{_mean_std(s.without_tta_mean, s.without_tta_std)} ({_num(s.without_tta_gain_mean, signed=True)})"
            row += [plain if math.isfinite(s.without_tta_mean) else NA]
        row += [_num(None if paper is None else TABLE1[b].get(paper)) for b in (GTAV, SYNTHIA)]
        rows.append(row)
    seeds = sorted({seed for s in summary.values() for seed in s.seeds})
    intro = [
        f"Our numbers: **{dataset_label}**, target val set, the `miou` column of results.csv (19-class protocol), "
        f"mean ± std over seeds {', '.join(map(str, seeds))} (std with ddof=1; per-seed values listed).",
        f"Δ: gain over {label(baseline)} paired by seed (each seed against the baseline run of the same seed): "
        "mean ± std of the per-seed differences.",
        "Columns `paper ...`: single runs published in Kang et al., NeurIPS 2020 (Table 1; DeepLab-v2 ResNet-101 "
        "on the real benchmarks), for reference only: they are not our numbers. The oracle (trained on target "
        "labels) has no paper figure.",
    ]
    if show.roles.control is not None and show.roles.control in summary:
        intro.append(f"{label(show.roles.control)} (ours, no paper figure): trained as PLCA with no target loss (no "
                     "association, no smoothing); the target images only pass through the network, which with "
                     "BatchNorm moves its running statistics toward the target. An adapted variant's gain over "
                     "this row is what its losses add.")
    if with_plain:
        intro.append("Variants evaluated with PLCA's test-time aggregation (Sec. 3.5) are also scored without it "
                     "(same models); Δ there is paired by seed against the same baseline.")
    align = "lllrlr" + ("r" if with_source_val else "") + ("r" if with_plain else "") + "rr"
    return _Table("", [], header, rows, align), intro


def table1_markdown(results: pd.DataFrame, *, dataset_label: str, show: Presentation) -> str:
    """Table 1 (ablation) as markdown: one row per variant of the table, ours (mean ± std, n, paired gain against
    show.roles.baseline) and the paper's column it is compared with."""
    table, intro = _table1(results, dataset_label, show)
    return _markdown([table], "Table 1: ablation, mIoU (%)", intro)


def table1_latex(results: pd.DataFrame, *, dataset_label: str, show: Presentation) -> str:
    """Table 1 as a LaTeX (booktabs) table; the caption names the domain pair of our numbers."""
    table, _ = _table1(results, dataset_label, show)
    caption = (
        f"Ablation, mIoU (%). Ours: {dataset_label}, mean ± std over seeds (ddof=1), Δ paired by seed against "
        f"{show.label(show.roles.baseline)}. Paper columns: published single runs (Kang et al., NeurIPS 2020), "
        "not our numbers."
    )
    return _latex([table], caption, "tab:ablation")


def write_table1(
    results: pd.DataFrame, md_path: Path | str, tex_path: Path | str, *, dataset_label: str, show: Presentation
) -> tuple[Path, Path]:
    """Write table1.md and table1.tex atomically."""
    md = table1_markdown(results, dataset_label=dataset_label, show=show)
    tex = table1_latex(results, dataset_label=dataset_label, show=show)
    return atomic_write_text(md_path, md), atomic_write_text(tex_path, tex)


# ---------------------------------------------------------------------------------------------- Tables 2 / 3


#: Table 2's columns of a row's published figures (params `variants.<name>.show.published`): facts from the
#: method's own paper on the real benchmarks, never our numbers.
PUBLISHED_GTA5 = "published GTA5→Cityscapes mIoU (19)"
PUBLISHED_SYNTHIA16 = "published SYNTHIA→Cityscapes mIoU (16)"
PUBLISHED_SYNTHIA13 = "published SYNTHIA→Cityscapes mIoU* (13)"


def delta_header(baseline_label: str) -> str:
    """Table 2's column of the paired gain over the baseline."""
    return f"Δ vs {baseline_label} (paired)"


def _published_sources(summary: Mapping[str, VariantSummary], show: Presentation) -> list[str]:
    """One line per row with published figures: its label, their source and how they were obtained."""
    lines = []
    for v in summary:
        published = show.published(v)
        if published is not None:
            note = f"; {published.note.strip().rstrip('.')}" if published.note else ""
            lines.append(f"{show.label(v)}: {published.source.strip().rstrip('.')}{note}.")
    return lines


def _table2(
    results: pd.DataFrame, dataset_label: str, show: Presentation, protocols: Sequence[int]
) -> tuple[list[_Table], list[str], list[str]]:
    """The 19- and 16/13-class blocks, the intro lines and the published figures' sources (one line a row)."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; known: {sorted(PROTOCOLS)}")
    baseline = show.roles.baseline
    # gains are paired against the baseline's runs whether or not the baseline is a row (as in Table 1)
    summary = _rows(summarize(results, baseline, show.baselines()), show, "table2")
    tables = []

    def published(v: str, key: str) -> str:
        figures = show.published(v)
        return _num(None if figures is None else getattr(figures, key))

    ids19 = PROTOCOLS[19]
    header = ["method", *(CLASS_ABBREV[CLASS_NAMES[i]] for i in ids19), "mIoU"]
    header += [delta_header(show.label(baseline)), PUBLISHED_GTA5]
    rows = []
    if 19 in protocols:
        for v, s in summary.items():
            cells = [_num(s.per_class[CLASS_NAMES[i]]) for i in ids19]
            delta = "reference" if v == baseline else _mean_std(s.gain_mean, s.gain_std, signed=True)
            if s.gain_vs != baseline and v != baseline:  # a row paired against its own network's baseline
                delta += f" (vs {show.short(s.gain_vs)})"
            rows.append([f"ours: {show.label(v)} (n={len(s.seeds)})", *cells, _num(s.mean), delta,
                         published(v, "gta5")])
    first_paper = len(rows)
    for paper in TABLE2.values():
        cells = [_num(paper.iou.get(CLASS_NAMES[i])) for i in ids19]
        rows.append([f"paper {paper.benchmark}: {paper.method}", *cells, _num(paper.miou), NA, NA])
    tables.append(
        _Table(
            "19 classes (layout of the paper's Table 2)",
            [],
            header,
            rows,
            "l" + "r" * (len(header) - 1),
            [first_paper] if first_paper else [],
        )
    )

    ids16 = PROTOCOLS[16]
    starred = set(ids16) - set(PROTOCOLS[13])
    header = ["method"]
    header += [CLASS_ABBREV[CLASS_NAMES[i]] + ("*" if i in starred else "") for i in ids16]
    header += ["mIoU (16)", "mIoU* (13)", PUBLISHED_SYNTHIA16, PUBLISHED_SYNTHIA13]
    rows = []
    if 16 in protocols or 13 in protocols:
        for v, s in summary.items():
            cells = [_num(s.per_class[CLASS_NAMES[i]]) if 16 in protocols or i not in starred else NA for i in ids16]
            miou16 = _num(s.miou16) if 16 in protocols else NA
            miou13 = _num(s.miou13) if 13 in protocols else NA
            rows.append([f"ours: {show.label(v)} (n={len(s.seeds)})", *cells, miou16, miou13,
                         published(v, "synthia16"), published(v, "synthia13")])
    first_paper = len(rows)
    for paper in TABLE3.values():
        cells = [_num(paper.iou.get(CLASS_NAMES[i])) for i in ids16]
        rows.append([f"paper {paper.benchmark}: {paper.method}", *cells, _num(paper.miou), _num(paper.miou13),
                     NA, NA])
    notes = ["Classes marked * are not in the 13-class protocol; mIoU* (13) averages the other 13."]
    if 16 in protocols or 13 in protocols:
        notes.append(
            "Our 16/13-class figures average the per-class IoUs of the 19-class evaluation (results.csv) over "
            "those classes; the SYNTHIA protocol would also train a 16-class model and ignore terrain, truck "
            "and train ground truth."
        )
    tables.append(
        _Table(
            "16 and 13 classes (layout of the paper's Table 3)",
            notes,
            header,
            rows,
            "l" + "r" * (len(header) - 1),
            [first_paper] if first_paper else [],
        )
    )
    intro = [
        f"Rows `ours: ...`: **{dataset_label}**, target val set, IoU (%) per class, mean over seeds (n given); "
        f"{NA} marks a class absent from the evaluation set. The mIoU column is the mean of the runs' recorded "
        "`miou`.",
        f"{delta_header(show.label(baseline))}: our mIoU gain over {show.label(baseline)} paired by seed (each seed "
        "against the baseline run of the same seed), mean ± std of the per-seed differences over the seeds both "
        "have, as in Table 1; a row trained on another network is paired against that network's own source-only "
        "row, named in its cell (params `variants.<name>.show.baseline`).",
        "Rows `paper ...`: published in Kang et al., NeurIPS 2020 (Tables 2 and 3, single runs on the real "
        "benchmarks), for reference only: they are not our numbers. Source Only there is CE + Lovász.",
        "Columns `published ...`: the method's own published mIoU on the real benchmarks (GTA5→Cityscapes, 19 "
        "classes; SYNTHIA→Cityscapes, 16 and 13 classes), a single figure from the source listed under the table "
        "(params `variants.<name>.show.published`), beside our measured row for reference only: they are not our "
        f"numbers and never come from our runs. {NA}: none published (or none configured).",
    ]
    return tables, intro, _published_sources(summary, show)


#: Title of the section under Table 2 that lists where the `published ...` columns come from.
SOURCES_TITLE = "Sources of the `published ...` columns (published figures, not our numbers)"


def table2_markdown(
    results: pd.DataFrame, *, dataset_label: str, show: Presentation, protocols: Sequence[int] = (19, 16, 13),
    notes: Sequence[str] = (),
) -> str:
    """Per-class IoU in the layout of the paper's Tables 2 and 3, the variants of the table plus the paper's
    reference rows.

    protocols: which class protocols apply to our runs; our rows appear only in the blocks listed. notes: lines on
    how rows were trained (the rounds of the self-training rows), after the intro.
    """
    tables, intro, sources = _table2(results, dataset_label, show, protocols)
    return _markdown(tables, "Table 2: per-class IoU (%)", [*intro, *notes], (SOURCES_TITLE, sources))


def table2_latex(
    results: pd.DataFrame, *, dataset_label: str, show: Presentation, protocols: Sequence[int] = (19, 16, 13),
    notes: Sequence[str] = (),
) -> str:
    """Tables 2/3 layout as LaTeX (booktabs), both blocks in one table."""
    tables, _, sources = _table2(results, dataset_label, show, protocols)
    baseline = show.label(show.roles.baseline)
    caption = (
        f"Per-class IoU (%). Ours: {dataset_label}, mean over seeds; Δ paired by seed against {baseline} (mean ± std "
        "of the per-seed differences). Paper rows: published single runs (Kang et al., NeurIPS 2020), not our "
        "numbers. Published columns: each method's own published single figure on the real benchmarks, for "
        "reference only, never from our runs (sources below the table)."
    )
    footer = ["Sources of the published columns (single figures on the real benchmarks, not our numbers, never from "
              "our runs):", *sources] if sources else []
    return _latex(tables, caption, "tab:per-class", [*notes, *footer])


def write_table2(
    results: pd.DataFrame,
    md_path: Path | str,
    tex_path: Path | str,
    *,
    dataset_label: str,
    show: Presentation,
    protocols: Sequence[int] = (19, 16, 13),
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write table2.md and table2.tex atomically."""
    md = table2_markdown(results, dataset_label=dataset_label, show=show, protocols=protocols, notes=notes)
    tex = table2_latex(results, dataset_label=dataset_label, show=show, protocols=protocols, notes=notes)
    return atomic_write_text(md_path, md), atomic_write_text(tex_path, tex)
