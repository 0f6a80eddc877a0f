"""DVC stage: regenerate reports/ (results.csv, Table 1 and 2, pseudo_labels.md, figures, summary.json) from every
run's outputs."""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
from _cli import setup

from plca.config import load_yaml
from plca.experiment import make_reader
from plca.params import PSEUDO_METRICS, Params
from plca.profile import changed_variants
from plca.report.build import ReportInputs, build_reports
from plca.report.config import Presentation

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np


def target_train_images(params: Params) -> Callable[[str], np.ndarray]:
    """A target train image by name, for the pseudo-label figure; the reader is opened at the first call only (a
    report with no pseudo-label set never looks at the train split)."""

    @cache
    def reader() -> tuple[Any, dict[str, int]]:
        train = make_reader(params.data.target, "train", with_labels=False)
        return train, {name: i for i, name in enumerate(train.names)}

    def image(name: str) -> np.ndarray:
        train, index = reader()
        if name not in index:
            raise FileNotFoundError(f"{params.data.target.root}: no target train image '{name}' (a pseudo-label set "
                                    "names it: was it made from other data? rerun its pseudo stage)")
        return train.read(index[name]).image

    return image


def main() -> None:
    parser = setup(__doc__)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    # rows trained otherwise than their profile says (a `dvc exp run -S` of their options) are marked as such
    changed = changed_variants(load_yaml(args.params), Path("profiles") / "default.yaml")
    try:
        show = Presentation({name: v.show for name, v in params.variants.items()}, params.report, changed)
    except ValueError as exc:  # a paper column the paper lacks: stop before reading any run
        sys.exit(f"error: {args.params}: params.{exc}")
    inputs = ReportInputs(
        metrics_dir=Path("metrics"), logs_dir=Path("logs"), eval_dir=Path("eval"),
        variants=params.all_variants, seeds=params.seeds, dataset_label=params.data.label,
        show=show,
        pseudo=params.runs.pseudo, pseudo_configs=params.pseudo, rounds=params.runs.rounds,
        round_steps={r: params.steps(r) for r in params.runs.rounds},
        pseudo_dir=Path("metrics") / PSEUDO_METRICS, target_train_image=target_train_images(params),
    )
    summary = build_reports(inputs, make_reader(params.data.target, "val"), params.evaluate.samples,
                            Path("reports"), command="dvc repro")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
