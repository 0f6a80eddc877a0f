"""Assemble reports/ from the pipeline's outputs: per-run metrics JSON, training logs, kept sample predictions."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from plca.io import ImageError, read_image, show_path
from plca.report import atomic_write_text, write_readme
from plca.report.config import Presentation
from plca.report.cycle_table import write_cycle_table
from plca.report.figures import (
    FigureError,
    PseudoLabelRow,
    class_iou_bars,
    find_training_logs,
    load_training_logs,
    pseudo_label_grid,
    qualitative_grid,
    training_curves,
)
from plca.report.pseudo_sets import describe_sets, load_summaries, sample_labels, write_pseudo_table
from plca.report.tables import (
    EXTRA_COLUMNS,
    headline,
    results_frame,
    summarize,
    write_results_csv,
    write_table1,
    write_table2,
)

if TYPE_CHECKING:  # params' schema; the report reads only policy/options of a set and pseudo of a round
    from plca.labelling import PseudoSetConfig
    from plca.params import RoundWiring

#: Pseudo-labels per set the figure shows (of the first seed; the pseudo stage keeps up to 4).
PSEUDO_FIGURE_SAMPLES = 3

#: Files in reports/ that this stage does not write, listed in its README.md when present.
_HAND_WRITTEN = (
    ("benchmarks.md", "measured speed and memory (written by `python -m plca.bench`, not by this stage)"),
    ("embedded-pair-findings.md", "why PLCA does not gain on the embedded toy pair: every check, pipeline or one-off "
                                  "(written by hand, not by this stage)"),
    ("worked-experiments.md", "what `dvc exp run` and `dvc queue` printed once (written by hand, not by this stage)"),
)


@dataclass
class ReportInputs:
    metrics_dir: Path
    logs_dir: Path
    eval_dir: Path
    #: The variants that ran (each has metrics and sample predictions per seed, and a training log per seed unless
    #: it is assembled rather than trained: an ensemble has none and is left out of the training curves).
    variants: Sequence[str]
    seeds: Sequence[int]
    dataset_label: str
    #: Labels, tables, colours and roles of the variants (params `variants.*.show` and `report`).
    show: Presentation
    #: Pseudo-label sets that ran (params `runs.pseudo`: set -> the run that labelled it), in params order.
    pseudo: Mapping[str, str] = field(default_factory=dict)
    #: Every set's config (params `pseudo`); the report shows its policy and options.
    pseudo_configs: Mapping[str, PseudoSetConfig] = field(default_factory=dict)
    #: The rounds (params `runs.rounds`: variant -> wiring); the report lists those learning from each set.
    rounds: Mapping[str, RoundWiring] = field(default_factory=dict)
    #: Optimiser steps of each round (params `steps` of the variants of `rounds`), for Table 2's notes.
    round_steps: Mapping[str, int] = field(default_factory=dict)
    #: Where the pseudo stage keeps each set's summaries and sample pseudo-labels (metrics/pseudo); needed when
    #: `pseudo` names a set.
    pseudo_dir: Path | None = None
    #: A target train image ([H, W, 3] uint8 RGB) by name, for the pseudo-label figure; needed when `pseudo` names
    #: a set.
    target_train_image: Callable[[str], np.ndarray] | None = None


def round_notes(inp: ReportInputs) -> list[str]:
    """One line per Table 2 row trained in rounds (the last round of a chain of `runs.rounds`): its rounds, their
    steps, the model the first starts from and the sets they learn from."""
    show, rounds = inp.show, inp.rounds
    starts = {w.init for w in rounds.values()}
    notes = []
    for v in show.order(inp.variants):
        if v not in rounds or v in starts or not show.in_table(v, "table2"):
            continue
        chain = [v]
        while rounds[chain[0]].init in rounds and rounds[chain[0]].init not in chain:
            chain.insert(0, rounds[chain[0]].init)
        steps = [inp.round_steps.get(r) for r in chain]
        init = rounds[chain[0]].init
        start = "the source-only model (pretrain)" if init not in inp.variants else show.label(init)
        counts = ", ".join("?" if n is None else str(n) for n in steps)
        total = "" if None in steps else f" ({sum(steps)} in all)"
        sets = ", ".join(rounds[r].pseudo for r in chain)
        if len(chain) == 1:
            notes.append(f"{show.label(v)}: 1 round of {counts} optimiser steps from {start}, learning from the "
                         f"pseudo-label set {sets} (reports/pseudo_labels.md).")
            continue
        notes.append(f"{show.label(v)}: {len(chain)} rounds of {counts} optimiser steps{total}, the first from "
                     f"{start}, each next from the one before, learning from the pseudo-label sets {sets} in turn "
                     "(reports/pseudo_labels.md).")
    return notes


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: metrics of this run are missing (did its evaluate stage run?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def collect_records(inp: ReportInputs) -> list[dict[str, Any]]:
    """One record per run, in the presentation's variant order (the tables' row order), then seed."""
    records = []
    for v in inp.show.order(inp.variants):
        for s in inp.seeds:
            m = _load_json(inp.metrics_dir / v / f"s{s}.json")
            rec = {"variant": v, "seed": s, "miou": m["miou"], "iou": m["iou"]}
            for extra in EXTRA_COLUMNS:
                if m.get(extra) is not None:
                    rec[extra] = m[extra]
            if m.get("cycles") is not None:
                rec["cycles"] = m["cycles"]
            records.append(rec)
    return records


def training_logs(inp: ReportInputs) -> tuple[pd.DataFrame, list[str]]:
    """The training logs of the variants that have any (`logs/<variant>/s<seed>.csv`), and the variants with none
    (assembled, not trained: ensembles), which the curves leave out. A variant with a log for some seeds but not
    others raises FileNotFoundError naming the missing files."""
    found, unlogged = find_training_logs(
        {(v, s): inp.logs_dir / v / f"s{s}.csv" for v in inp.show.order(inp.variants) for s in inp.seeds}
    )
    if not found:
        raise FigureError(f"{inp.logs_dir}: no training log of any variant {list(inp.variants)} (did they train?)")
    return load_training_logs(found), unlogged


def _read_mask(path: Path, what: str = "sample prediction") -> np.ndarray:
    try:
        return read_image(path, cv2.IMREAD_UNCHANGED)
    except (OSError, ImageError):
        raise FileNotFoundError(f"{show_path(path)}: {what} missing or unreadable") from None


def pseudo_reports(inp: ReportInputs, out_dir: Path, samples: int = PSEUDO_FIGURE_SAMPLES) -> list[tuple[str, str]]:
    """Write pseudo_labels.md (always) and figures/pseudo_labels.png (when a set ran; otherwise any old one is
    removed); returns their README entries. A set whose summary of a seed is missing raises FileNotFoundError
    naming the file."""
    sets = describe_sets(inp.pseudo, inp.pseudo_configs, inp.rounds)
    figure = out_dir / "figures" / "pseudo_labels.png"
    entries = [("pseudo_labels.md", "the pseudo-label sets rounds learn from: labeller, policy, images labelled, "
                                    "coverage and precision against target train labels (a diagnostic)")]
    if not sets:
        write_pseudo_table([], {}, out_dir / "pseudo_labels.md", dataset_label=inp.dataset_label)
        figure.unlink(missing_ok=True)
        return entries
    if inp.pseudo_dir is None or inp.target_train_image is None:
        raise ValueError(f"pseudo-label sets {list(inp.pseudo)} ran but the report was given no "
                         f"{'pseudo_dir' if inp.pseudo_dir is None else 'target_train_image'} to read them with")
    summaries = load_summaries(inp.pseudo_dir, sets, inp.seeds)
    label = inp.show.label
    write_pseudo_table(sets, summaries, out_dir / "pseudo_labels.md", dataset_label=inp.dataset_label, label=label,
                       pseudo_dir=inp.pseudo_dir)
    seed = inp.seeds[0]
    rows = []
    for s in sets:
        pngs = sample_labels(inp.pseudo_dir, s.name, seed, samples, summaries[s.name][seed].get("labelled"))
        rows.append(PseudoLabelRow(
            title=f"{s.name}: labelled by {label(s.labeller)} ({s.policy})",
            names=[p.stem for p in pngs],
            images=[inp.target_train_image(p.stem) for p in pngs],
            labels=[_read_mask(p, "pseudo-label") for p in pngs],
        ))
    pseudo_label_grid(figure, rows, title=f"Pseudo-labels of target train images, seed {seed} — {inp.dataset_label}")
    entries.append(("figures/pseudo_labels.png", f"each pseudo-label set's first (up to {samples}) labelled target "
                                                 f"train images (seed {seed}) and their pseudo-labels (black: none)"))
    return entries


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 3)


def build_reports(inp: ReportInputs, target_val: Any, sample_indices: Sequence[int], out_dir: Path,
                  command: str) -> dict[str, Any]:
    """Write results.csv, Table 1/2 (md + tex), cycles.md, pseudo_labels.md, figures, summary.json and README.md
    into `out_dir`."""
    show, roles, label = inp.show, inp.show.roles, inp.dataset_label
    records = collect_records(inp)
    pseudo_entries = pseudo_reports(inp, out_dir)  # before the rest: a set's missing summary stops the report
    results = results_frame(records)
    write_results_csv(results, out_dir / "results.csv")
    write_table1(results, out_dir / "table1.md", out_dir / "table1.tex", dataset_label=label, show=show)
    write_table2(results, out_dir / "table2.md", out_dir / "table2.tex", dataset_label=label, show=show,
                 notes=round_notes(inp))
    write_cycle_table(records, out_dir / "cycles.md", dataset_label=label, show=show)

    figs = out_dir / "figures"
    seed = inp.seeds[0]
    rows = [i for i in sample_indices if i < len(target_val)]
    samples = [target_val.read(i) for i in rows]
    columns = show.present(roles.qualitative, inp.variants)
    preds = {
        show.short(v): [_read_mask(inp.eval_dir / v / f"s{seed}" / "samples" / f"{s.name}.png") for s in samples]
        for v in columns
    }
    qualitative_grid(figs / "qualitative.png", [s.image for s in samples], [s.label for s in samples], preds,
                     row_names=[s.name for s in samples],
                     title=f"Target val, seed {seed} — {label}")
    logs, unlogged = training_logs(inp)
    training_curves(figs / "training_curves.png", logs, show=show, title=f"Training curves — {label}",
                    unlogged=unlogged)
    bars = show.present(roles.class_iou, inp.variants)
    class_iou_bars(figs / "class_iou.png", results, dataset_label=label, variants=bars, show=show)

    summ = summarize(results, roles.baseline)
    # DVC metrics keys: `dvc exp show` names the gain column after the baseline (e.g. plca.gain_vs_<baseline>)
    gain_key = f"gain_vs_{roles.baseline}"
    summary = {
        v: {"miou_mean": _finite(s.mean), "miou_std": _finite(s.std), gain_key: _finite(s.gain_mean),
            "source_val_miou": _finite(s.source_val_mean), "miou_without_tta": _finite(s.without_tta_mean),
            "gain_without_tta": _finite(s.without_tta_gain_mean)}
        for v, s in summ.items()
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_readme(
        out_dir / "README.md",
        [
            ("table1.md", "Table 1 ablation: mean ± std over seeds, paired gain over "
                          f"{show.short(roles.baseline)}, paper figures apart"),
            ("table2.md", "Tables 2/3 layout: per-class IoU, mIoU over 19, 16 and 13 classes, paired gain over "
                          f"{show.short(roles.baseline)}, methods' published figures apart"),
            ("results.csv", "one row per variant and seed: mIoU and per-class IoU (target val)"),
            ("cycles.md", "what PLCA's cycles pick on each variant's models, scored with target labels (a diagnostic)"),
            ("figures/qualitative.png", "Fig. 3 style: "
                                        + " | ".join(["target image", "ground truth", *map(show.short, columns)])),
            ("figures/training_curves.png", "every logged loss term per variant, mean over seeds with min-max band"
                                            + (f" (no training log, not drawn: {', '.join(map(show.short, unlogged))})"
                                               if unlogged else "")),
            ("figures/class_iou.png", f"per-class IoU: {' vs '.join(map(show.short, bars))}, mean ± std over seeds"),
            ("summary.json", "per-variant mean/std mIoU (the DVC metrics file)"),
            *pseudo_entries,
        ] + [(name, about) for name, about in _HAND_WRITTEN if (out_dir / name).is_file()],
        dataset_label=label,
        command=command,
        summary=headline(results, show) if len(show.present([roles.headline, roles.baseline], inp.variants)) == 2
        else None,
    )
    return summary
