"""What PLCA's cycles do on a trained model, scored with target labels that training never sees.

Pairs source val image k with target val image k, runs the cycle of Eq. 2-3 on features (cosine) and on
predictions (KL) exactly as the association loss does (the target aggregated with SAGG), and asks: how many
source cells close a cycle, how often the target cell a cycle picks really has the source cell's class, and
whether that label tells the model anything its own classifier does not already know. The released code logs
the first two during training ("pos_ratio", "correct_ratio"); with labelled val pairs we can also compare them to
the classifier. A diagnostic: it changes no model and no mIoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plca.data.labels import IGNORE_INDEX
from plca.data.transforms import TransformConfig
from plca.evaluation.inference import read_labelled
from plca.losses import associate, downsample_labels
from plca.losses.constants import DEFAULT_ALPHA
from plca.models.output import FEATURES, LOGITS, class_argmax

#: The two levels PLCA associates: (name in the outputs, similarity).
LEVELS: tuple[tuple[str, str], ...] = (("features", "cosine"), ("predictions", "kl"))
#: Who asks for labels, in the error raised for an unlabelled val item.
NEEDS = "cycle diagnostics need"


@dataclass
class CycleConfig:
    #: Val pairs (source image k, target image k) to measure; at most the shorter val list.
    pairs: int = 100
    batch_size: int = 8
    #: SAGG weight on the target, as in training (`methods.plca.alpha`).
    alpha: float = DEFAULT_ALPHA
    #: Network input size (w, h) of both images; None = as stored. Must give both domains the same grid.
    input_size: tuple[int, int] | None = None
    ignore_index: int = IGNORE_INDEX


@dataclass
class _Counts:
    labelled: int = 0  # labelled source cells: those that start a cycle
    positive: int = 0  # ... whose cycle returns to a cell of their class (what the loss trains on)
    scored: int = 0  # positives whose chosen target cell j* has a target label
    cycle_right: int = 0  # ... where that label is the source cell's class
    classifier_right: int = 0  # ... where the classifier's arg-max at j* is right
    corrects: int = 0  # ... cycle right, classifier wrong: what association could teach
    misleads: int = 0  # ... cycle wrong, classifier right: what it could unteach
    chosen: int = 0  # distinct j* over the pairs
    target_cells: int = 0

    def add(self, other: _Counts) -> None:
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))


def _share(num: int, den: int) -> float | None:
    return None if den == 0 else 100.0 * num / den


def _level_counts(source: torch.Tensor, target: torch.Tensor, ys: torch.Tensor, yt: torch.Tensor,
                  target_pred: torch.Tensor, similarity: str, cfg: CycleConfig) -> _Counts:
    res = associate(source, target, ys, similarity=similarity, aggregate_target=True, alpha=cfg.alpha,
                    ignore_index=cfg.ignore_index, impl="auto")
    n = ys.shape[0]
    pos = res.positive.reshape(n, -1)
    j = res.target_index.reshape(n, -1)
    pair = torch.arange(n, device=ys.device)[:, None].expand_as(pos)[pos]
    j_pos = j[pos]
    source_label = ys.reshape(n, -1)[pos]
    target_label = yt.reshape(n, -1)[pair, j_pos]
    predicted = target_pred.reshape(n, -1)[pair, j_pos]
    scored = target_label != cfg.ignore_index
    cycle_ok = (source_label == target_label) & scored
    clf_ok = (predicted == target_label) & scored
    cells = yt[0].numel()
    chosen = int(torch.unique(pair * cells + j_pos).numel())  # distinct (pair, j*)
    return _Counts(
        labelled=res.num_valid_source, positive=res.num_positive, scored=int(scored.sum()),
        cycle_right=int(cycle_ok.sum()), classifier_right=int(clf_ok.sum()),
        corrects=int((cycle_ok & ~clf_ok).sum()), misleads=int((clf_ok & ~cycle_ok).sum()),
        chosen=chosen, target_cells=n * cells,
    )


@torch.no_grad()
def cycle_diagnostics(model: Any, source_reader: Any, target_reader: Any, tcfg: TransformConfig, cfg: CycleConfig,
                      device: torch.device) -> dict[str, Any]:
    """Cycle statistics per level ("features", "predictions") over the first `cfg.pairs` val pairs, in % where
    a share:

    - positive_rate: labelled source cells whose cycle returns to their class (the cells the loss trains on);
    - cycle_right: of those, the ones whose chosen target cell has the source cell's class (target labels);
    - classifier_right_at_cycle: the classifier's plain arg-max right at those same target cells;
    - corrects / misleads: cycle right where the classifier is wrong / the reverse (shares of the same cells);
    - chosen_per_target_cell: distinct target cells chosen by positive cycles, per target cell.

    Plus `classifier_right`: the classifier right on all labelled target cells of the grid, and `pairs`.
    """
    pairs = min(cfg.pairs, len(source_reader), len(target_reader))
    if pairs < 1:
        raise ValueError(f"cycle diagnostics need at least one val pair, got {pairs} "
                         f"(pairs={cfg.pairs}, {source_reader.root}: {len(source_reader)}, "
                         f"{target_reader.root}: {len(target_reader)})")
    model.eval()
    totals = {name: _Counts() for name, _ in LEVELS}
    target_labelled = target_right = 0
    for start in range(0, pairs, cfg.batch_size):
        idx = range(start, min(start + cfg.batch_size, pairs))
        src = [read_labelled(source_reader, i, tcfg, cfg.input_size, NEEDS) for i in idx]
        tgt = [read_labelled(target_reader, i, tcfg, cfg.input_size, NEEDS) for i in idx]
        try:
            xs = torch.from_numpy(np.stack([s[0] for s in src])).to(device)
            xt = torch.from_numpy(np.stack([t[0] for t in tgt])).to(device)
            ys = torch.from_numpy(np.stack([s[1] for s in src])).to(device)
            yt = torch.from_numpy(np.stack([t[1] for t in tgt])).to(device)
        except ValueError as exc:  # np.stack: sizes differ inside a domain
            raise ValueError(f"cycle diagnostics: val images {idx.start}..{idx.stop - 1} differ in size; set "
                             f"an input size (data.eval_size) ({exc})") from None
        out_s, out_t = model(xs), model(xt)
        fs, ls, ft, lt = out_s[FEATURES], out_s[LOGITS], out_t[FEATURES], out_t[LOGITS]
        if fs.shape[-2:] != ft.shape[-2:]:
            raise ValueError(f"cycle diagnostics: source and target feature grids differ ({tuple(fs.shape[-2:])} "
                             f"vs {tuple(ft.shape[-2:])}); set one input size (data.eval_size) for both")
        grid = tuple(fs.shape[-2:])
        ys_grid, yt_grid = downsample_labels(ys, grid), downsample_labels(yt, grid)
        pred = class_argmax(lt)
        labelled = yt_grid != cfg.ignore_index
        target_labelled += int(labelled.sum())
        target_right += int(((pred == yt_grid) & labelled).sum())
        inputs = {"features": (fs.float(), ft.float()), "predictions": (ls.float().softmax(1), lt.float().softmax(1))}
        for name, similarity in LEVELS:
            totals[name].add(_level_counts(*inputs[name], ys_grid, yt_grid, pred, similarity, cfg))

    out: dict[str, Any] = {"pairs": pairs, "classifier_right": _share(target_right, target_labelled)}
    for name, c in totals.items():
        out[name] = {
            "positive_rate": _share(c.positive, c.labelled),
            "cycle_right": _share(c.cycle_right, c.scored),
            "classifier_right_at_cycle": _share(c.classifier_right, c.scored),
            "corrects": _share(c.corrects, c.scored),
            "misleads": _share(c.misleads, c.scored),
            "chosen_per_target_cell": None if c.target_cells == 0 else c.chosen / c.target_cells,
        }
    return out
