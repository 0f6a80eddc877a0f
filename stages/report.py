"""DVC stage: regenerate reports/ (results.csv, Table 1 and 2, figures, summary.json) from every run's outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import make_reader
from plca.report.build import ReportInputs, build_reports
from plca.report.config import Presentation


def main() -> None:
    parser = setup(__doc__)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    try:
        show = Presentation({name: v.show for name, v in params.variants.items()}, params.report)
    except ValueError as exc:  # a paper column the paper lacks: stop before reading any run
        sys.exit(f"error: {args.params}: params.{exc}")
    inputs = ReportInputs(
        metrics_dir=Path("metrics"), logs_dir=Path("logs"), eval_dir=Path("eval"),
        variants=params.all_variants, seeds=params.seeds, dataset_label=params.data.label,
        show=show,
    )
    summary = build_reports(inputs, make_reader(params.data.target, "val"), params.evaluate.samples,
                            Path("reports"), command="dvc repro")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
