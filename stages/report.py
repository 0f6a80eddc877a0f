"""DVC stage: regenerate reports/ (results.csv, Table 1 and 2, figures, summary.json) from every run's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import make_reader
from plca.report.build import ReportInputs, build_reports


def main() -> None:
    parser = setup(__doc__)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    inputs = ReportInputs(
        metrics_dir=Path("metrics"), logs_dir=Path("logs"), eval_dir=Path("eval"),
        variants=params.all_variants, seeds=params.seeds, dataset_label=params.data.label,
    )
    summary = build_reports(inputs, make_reader(params.data.target, "val"), params.evaluate.samples,
                            Path("reports"), command="dvc repro")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
