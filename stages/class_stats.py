"""DVC stage: count the pixels of each class in every source train label, once (stats/source_classes.json). Rare
class sampling (DAFormer's RCS) draws its classes and images from these counts."""

from __future__ import annotations

import json

import _common
from _cli import setup

from plca.experiment import class_stats_run


def main() -> None:
    parser = setup(__doc__)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    print(json.dumps(class_stats_run(params, _common.CLASS_STATS, progress=not args.no_progress)), flush=True)


if __name__ == "__main__":
    main()
