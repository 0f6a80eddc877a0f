"""Report figures as PNGs: the qualitative grid of the paper's Fig. 3, the pseudo-label sets' samples, training
curves of every logged term, and per-class IoU bars.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here touches global backend
state and every call is independent. A variant's legend label and colour come from the caller's `Presentation`
(params `variants.<name>.show`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from plca.data.labels import CLASS_NAMES, NUM_CLASSES, PALETTE, colorize
from plca.report import atomic_write
from plca.report.config import Presentation
from plca.report.paper import CLASS_ABBREV
from plca.report.tables import check_results

#: Columns of a training log that index it rather than hold a logged term.
LOG_INDEX = ("variant", "seed", "step")


class FigureError(ValueError):
    """Figure inputs are malformed (mismatched shapes, missing columns, nothing to plot)."""


@dataclass(frozen=True)
class FigureConfig:
    """Look of the report figures."""

    dpi: int = 100
    #: width of one image panel of the qualitative grid, inches
    panel_width: float = 2.4
    #: size of one subplot of the training curves, inches (width, height)
    curve_size: tuple[float, float] = (4.0, 2.6)
    #: rolling-mean window over logged steps for the training curves (1 = raw)
    curve_smooth: int = 1
    #: classes per row of the qualitative grid's legend
    legend_columns: int = 7


def _save(fig: Figure, path: Path | str, dpi: int) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


# ---------------------------------------------------------------------------------------------- Fig. 3


def qualitative_grid(
    path: Path | str,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    *,
    row_names: Sequence[str] | None = None,
    title: str | None = None,
    config: FigureConfig = FigureConfig(),
) -> Path:
    """Grid like the paper's Fig. 3: one row per image; columns target image | ground truth | one column per
    entry of predictions (e.g. {"source-only": [...], "PLCA": [...]}), in the Cityscapes palette, with a legend
    of the classes shown.

    images: [H, W, 3] uint8 RGB; labels and predictions: [H, W] train ids (255 = ignore, drawn black).
    """
    n = len(images)
    if n == 0:
        raise FigureError(f"{path}: no images for the qualitative grid")
    columns = {"ground truth": labels, **predictions}
    for name, maps in columns.items():
        if len(maps) != n:
            raise FigureError(f"{path}: column {name!r} has {len(maps)} maps for {n} images")
    if row_names is not None and len(row_names) != n:
        raise FigureError(f"{path}: {len(row_names)} row names for {n} images")
    present: set[int] = set()
    for r, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise FigureError(f"{path}: image {r} must be [H, W, 3] uint8, got {image.dtype} {image.shape}")
        for name, maps in columns.items():
            m = maps[r]
            if m.shape != image.shape[:2] or not np.issubdtype(m.dtype, np.integer):
                raise FigureError(
                    f"{path}: {name!r} map {r} must be integer {image.shape[:2]}, got {m.dtype} {m.shape}"
                )
            present.update(int(c) for c in np.unique(m) if c < NUM_CLASSES)

    aspect = max(im.shape[0] / im.shape[1] for im in images)
    ncols = 1 + len(columns)
    panel_w, panel_h = config.panel_width, config.panel_width * aspect
    head, legend_rows = 0.35 + (0.3 if title else 0.0), math.ceil(len(present) / config.legend_columns)
    foot = 0.25 * legend_rows + 0.15
    side = 0.35 if row_names is not None else 0.05
    width, height = side + ncols * panel_w * 1.03, head + n * panel_h * 1.04 + foot
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(
        n,
        ncols,
        squeeze=False,
        gridspec_kw={
            "left": side / width,
            "right": 1 - 0.02 / width,
            "top": 1 - head / height,
            "bottom": foot / height,
            "wspace": 0.03,
            "hspace": 0.04,
        },
    )
    titles = ["target image", *columns]
    for r in range(n):
        panels = [images[r], *(colorize(np.asarray(maps[r])) for maps in columns.values())]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        if row_names is not None:
            axes[r, 0].set_ylabel(row_names[r], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    handles = [Patch(facecolor=PALETTE[c] / 255.0, label=CLASS_NAMES[c]) for c in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=config.legend_columns, fontsize=7, frameon=False)
    return _save(fig, path, config.dpi)


@dataclass(frozen=True)
class PseudoLabelRow:
    """One row of the pseudo-label figure: a set's title and its sample images with their pseudo-labels."""

    title: str
    names: Sequence[str]
    #: [H, W, 3] uint8 RGB target images
    images: Sequence[np.ndarray]
    #: [H, W] train ids of each image, 255 = no pseudo-label (drawn black)
    labels: Sequence[np.ndarray]


def pseudo_label_grid(
    path: Path | str,
    rows: Sequence[PseudoLabelRow],
    *,
    title: str | None = None,
    config: FigureConfig = FigureConfig(),
) -> Path:
    """One row per pseudo-label set, headed by its title: each sample's target image then its pseudo-label in the
    Cityscapes palette (unlabelled pixels black), as many pairs as the row with the most samples (a row with none
    says so); a legend of the classes shown and of black. Columns = 2 x the most samples of a row."""
    if not rows:
        raise FigureError(f"{path}: no pseudo-label set to draw")
    present: set[int] = set()
    for row in rows:
        if not len(row.names) == len(row.images) == len(row.labels):
            raise FigureError(f"{path}: row {row.title!r} has {len(row.names)} names, {len(row.images)} images and "
                              f"{len(row.labels)} pseudo-labels")
        for name, image, label in zip(row.names, row.images, row.labels, strict=True):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise FigureError(f"{path}: {row.title!r}: image {name} must be [H, W, 3] uint8, got {image.dtype} "
                                  f"{image.shape}")
            if label.shape != image.shape[:2] or not np.issubdtype(label.dtype, np.integer):
                raise FigureError(f"{path}: {row.title!r}: pseudo-label of {name} must be integer {image.shape[:2]} "
                                  f"(its image's size), got {label.dtype} {label.shape}")
            present.update(int(c) for c in np.unique(label) if c < NUM_CLASSES)
    pairs = max(1, max(len(row.names) for row in rows))
    shapes = [im.shape for row in rows for im in row.images]
    aspect = max((h / w for h, w, _ in shapes), default=0.5)
    panel_w = config.panel_width
    panel_h = panel_w * aspect
    row_head = 0.6  # the set's title and the panels' titles
    legend_rows = math.ceil((len(present) + 1) / config.legend_columns)
    head, foot = (0.4 if title else 0.1), 0.25 * legend_rows + 0.15
    width = 2 * pairs * panel_w * 1.03 + 0.1
    height = head + len(rows) * (panel_h + row_head) + foot
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(len(rows), 2 * pairs, left=0.05 / width, right=1 - 0.05 / width,
                            top=1 - (head + row_head) / height, bottom=foot / height, wspace=0.03,
                            hspace=row_head / panel_h)
    for r, row in enumerate(rows):
        for c in range(2 * pairs):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            k = c // 2
            if k >= len(row.names):
                ax.set_axis_off()
                if not row.names and c == 0:
                    ax.text(0.0, 0.5, "no image labelled", fontsize=8, va="center", transform=ax.transAxes)
                continue
            if c % 2 == 0:
                ax.imshow(row.images[k], interpolation="nearest")
                ax.set_title(row.names[k], fontsize=6)
            else:
                ax.imshow(colorize(np.asarray(row.labels[k])), interpolation="nearest")
                ax.set_title("pseudo-label", fontsize=6)
        top = 1 - (head + r * (panel_h + row_head)) / height
        fig.text(0.05 / width, top - 0.12 / height, row.title, fontsize=8, fontweight="bold", va="top", ha="left")
    if title:
        fig.suptitle(title, fontsize=9)
    handles = [Patch(facecolor=PALETTE[c] / 255.0, label=CLASS_NAMES[c]) for c in sorted(present)]
    handles.append(Patch(facecolor="black", label="no pseudo-label"))
    fig.legend(handles=handles, loc="lower center", ncol=config.legend_columns, fontsize=7, frameon=False)
    return _save(fig, path, config.dpi)


# ---------------------------------------------------------------------------------------------- curves


def find_training_logs(
    paths: Mapping[tuple[str, int], Path | str],
) -> tuple[dict[tuple[str, int], Path], list[str]]:
    """Split the expected training logs ({(variant, seed): csv path}) into those to draw and the variants that have
    none (assembled, not trained: an ensemble), which the curves leave out.

    A variant is drawn when at least one of its logs exists. A variant with logs for some seeds but not others
    was trained, so a missing log is an error: FileNotFoundError naming the variant and the missing files.
    """
    by_variant: dict[str, list[tuple[int, Path]]] = {}
    for (variant, seed), path in paths.items():
        by_variant.setdefault(variant, []).append((seed, Path(path)))
    found: dict[tuple[str, int], Path] = {}
    unlogged: list[str] = []
    for variant, runs in by_variant.items():
        missing = [str(path) for _, path in runs if not path.is_file()]
        if len(missing) == len(runs):
            unlogged.append(variant)
            continue
        if missing:
            have = [str(path) for _, path in runs if path.is_file()]
            raise FileNotFoundError(
                f"training logs of variant {variant!r} missing: {missing} (it has {have}; a trained variant needs a "
                "log per seed: did its train stage run for every seed?)"
            )
        found.update({(variant, seed): path for seed, path in runs})
    return found, unlogged


def load_training_logs(paths: Mapping[tuple[str, int], Path | str]) -> pd.DataFrame:
    """Read per-run training logs ({(variant, seed): csv path}, columns step, then any logged terms) into one
    long DataFrame with columns variant, seed, step and the union of the terms (NaN where a run lacks one).
    Every path must exist (`find_training_logs` leaves out the variants that have none)."""
    frames = []
    for (variant, seed), path in paths.items():
        try:
            frame = pd.read_csv(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: training log of variant {variant!r} seed {seed} is missing") from None
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise FigureError(f"{path}: not a training log CSV ({exc})") from exc
        if "step" not in frame.columns:
            raise FigureError(f"{path}: training log has no 'step' column (columns: {list(frame.columns)})")
        clash = [c for c in ("variant", "seed") if c in frame.columns]
        if clash:
            raise FigureError(f"{path}: training log may not hold columns {clash}")
        bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise FigureError(f"{path}: non-numeric columns {bad}")
        frames.append(frame.assign(variant=variant, seed=seed))
    if not frames:
        raise FigureError("no training logs given")
    logs = pd.concat(frames, ignore_index=True, sort=False)
    terms = [c for c in logs.columns if c not in LOG_INDEX]
    return logs[[*LOG_INDEX, *terms]]


#: A panel that draws at most this many of the figure's variants (a term only some variants log) names them in a
#: legend of its own, so a line need not be told apart by colour alone.
PANEL_LEGEND_MAX = 6


def training_curves(
    path: Path | str,
    logs: pd.DataFrame,
    *,
    show: Presentation,
    terms: Sequence[str] | None = None,
    title: str | None = None,
    unlogged: Sequence[str] = (),
    config: FigureConfig = FigureConfig(),
) -> Path:
    """One subplot per logged term (every column but variant/seed/step unless terms says otherwise), one line per
    variant that logs it (in show's order, its colour and label): the mean over seeds at each step, with the seeds'
    min-max as a band. A panel drawing only some of the variants (at most PANEL_LEGEND_MAX) names them in its own
    legend; the figure's legend names every variant drawn. unlogged: variants without a training log (ensembles),
    named under the title as left out."""
    missing = [c for c in LOG_INDEX if c not in logs.columns]
    if missing:
        raise FigureError(f"{path}: training logs lack columns {missing}")
    terms = list(terms) if terms is not None else [c for c in logs.columns if c not in LOG_INDEX]
    unknown = [t for t in terms if t not in logs.columns]
    if unknown:
        raise FigureError(f"{path}: no logged term {unknown} (have {[c for c in logs.columns if c not in LOG_INDEX]})")
    terms = [t for t in terms if logs[t].notna().any()]
    if not terms:
        raise FigureError(f"{path}: nothing logged to plot")
    variants = show.order(logs["variant"].unique())
    ncols = min(3 if len(terms) <= 9 else 4, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    w, h = config.curve_size
    fig = Figure(figsize=(w * ncols, h * nrows + 0.6 + 0.2 * math.ceil(len(variants) / 4)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    drawn: dict[str, object] = {}
    for ax, term in zip(axes.flat, terms, strict=False):
        here = [v for v in variants if logs.loc[logs["variant"] == v, term].notna().any()]
        # overlapping bands of many variants blur into one another: fainter the more there are
        alpha = 0.2 if len(here) <= 4 else 0.1
        lines = []
        for variant in here:
            rows = logs[(logs["variant"] == variant) & logs[term].notna()]
            per_seed = rows.pivot_table(index="step", columns="seed", values=term, aggfunc="mean").sort_index()
            if config.curve_smooth > 1:
                per_seed = per_seed.rolling(config.curve_smooth, min_periods=1).mean()
            steps = per_seed.index.to_numpy(dtype=float)
            color = show.colour(variant)
            (line,) = ax.plot(steps, per_seed.mean(axis=1).to_numpy(), color=color, linewidth=1.2)
            if per_seed.shape[1] > 1:
                ax.fill_between(steps, per_seed.min(axis=1), per_seed.max(axis=1), color=color, alpha=alpha, lw=0)
            drawn.setdefault(variant, line)
            lines.append(line)
        if len(here) < len(variants) and len(here) <= PANEL_LEGEND_MAX:
            ax.legend(lines, [show.short(v) for v in here], fontsize=6, frameon=False, loc="best")
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms) :]:
        ax.set_visible(False)
    order = [v for v in variants if v in drawn]  # show's order, whichever panel drew a variant first
    fig.legend(
        [drawn[v] for v in order],
        [show.label(v) for v in order],
        loc="outside lower center",
        ncol=min(4, len(order)),
        fontsize=8,
        frameon=False,
    )
    lo, hi = logs.groupby("variant")["seed"].nunique().agg(["min", "max"])
    n_seeds = f"{lo}" if lo == hi else f"{lo}-{hi}"
    left_out = [v for v in show.order(unlogged) if v not in drawn]
    fig.suptitle(
        (title + "\n" if title else "")
        + f"training curves: mean over seeds (n = {n_seeds}), band = min-max over seeds"
        + (f"\nno training log (assembled, not trained), not drawn: {', '.join(map(show.label, left_out))}"
           if left_out else ""),
        fontsize=9,
    )
    return _save(fig, path, config.dpi)


# ---------------------------------------------------------------------------------------------- bars


def class_iou_bars(
    path: Path | str,
    results: pd.DataFrame,
    *,
    dataset_label: str,
    variants: Sequence[str],
    show: Presentation,
    config: FigureConfig = FigureConfig(),
) -> Path:
    """Grouped bars of per-class IoU of `variants` (those with results; colours and labels from show), mean over
    seeds with std (ddof=1) error bars, one group per class; classes absent from the evaluation set (NaN in every
    run) are left out and named in the axis label."""
    results = check_results(results, str(path))
    have = [v for v in variants if (results["variant"] == v).any()]
    if not have:
        raise FigureError(f"{path}: none of the variants {list(variants)} in the results")
    chosen = results[results["variant"].isin(have)]
    classes = [c for c in CLASS_NAMES if chosen[c].notna().any()]
    absent = [c for c in CLASS_NAMES if c not in classes]
    x = np.arange(len(classes))
    width = 0.8 / len(have)
    fig = Figure(figsize=(max(6.0, 0.55 * len(classes) + 1.5), 3.6), layout="constrained")
    ax = fig.subplots()
    for k, variant in enumerate(have):
        rows = chosen[chosen["variant"] == variant]
        mean = rows[classes].mean().to_numpy(dtype=float)
        std = rows[classes].std(ddof=1).fillna(0.0).to_numpy(dtype=float) if len(rows) > 1 else np.zeros(len(x))
        ax.bar(
            x + (k - (len(have) - 1) / 2) * width,
            np.nan_to_num(mean),
            width,
            yerr=std,
            color=show.colour(variant),
            label=f"{show.label(variant)} (n={len(rows)})",
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
    ax.set_xticks(x, [CLASS_ABBREV[c] for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, ncol=len(have), loc="outside lower center", frameon=False)
    if absent:
        ax.set_xlabel(f"absent from the evaluation set, not shown: {', '.join(absent)}", fontsize=7)
    ax.set_title(f"Per-class IoU, {dataset_label}: mean ± std over seeds", fontsize=9)
    return _save(fig, path, config.dpi)
