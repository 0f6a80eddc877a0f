"""Small per-run figures logged with an evaluation: the confusion matrix and a strip of sample predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plca.data.labels import CLASS_NAMES, colorize  # noqa: E402
from plca.io import atomic_write  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def confusion_figure(counts: np.ndarray, path: Path, title: str) -> None:
    """Row-normalised confusion matrix (ground truth rows, predicted columns; last column = other)."""
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    names = list(CLASS_NAMES)
    ax.set_xticks(range(len(names) + 1), [*names, "other"], rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def sample_strip(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """One row per sample: image | ground truth | prediction (train ids in the Cityscapes palette)."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 1.6 * len(rows) + 0.4), squeeze=False)
    for r, (name, image, gt, pred) in enumerate(rows):
        for c, (panel, title) in enumerate(((image, name), (colorize(gt), "ground truth"),
                                           (colorize(pred), "prediction"))):
            axes[r, c].imshow(panel)
            axes[r, c].set_title(title, fontsize=7)
            axes[r, c].axis("off")
    _save(fig, path)
