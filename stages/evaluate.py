"""DVC stage: score one trained variant on target val (and source val), every seed (or the seeds given), in one
process."""

from __future__ import annotations

import json
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import RunSpec, evaluate_run


def main() -> None:
    parser = setup(__doc__)
    parser.add_argument("--run", required=True, help="a variant name from params.variants")
    _common.add_seed_option(parser)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    tracking = _common.tracking_config(params)
    for seed in args.seed or params.seeds:
        result = evaluate_run(
            params, RunSpec(args.run, seed),
            model_path=_common.model_path(args.run, seed),
            out_dir=Path("eval") / args.run / f"s{seed}",
            metrics_path=Path("metrics") / args.run / f"s{seed}.json",
            tracking=tracking,
            tags=_common.tags(params, "evaluate", args.run, seed),
            progress=not args.no_progress,
        )
        print(json.dumps({k: result[k] for k in ("variant", "seed", "miou", "source_val_miou")}), flush=True)


if __name__ == "__main__":
    main()
