"""DVC stage: train one run — the source-only pretraining, or one Table 1 variant for one seed."""

from __future__ import annotations

import json
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import PRETRAIN, RunSpec, train_run


def main() -> None:
    parser = setup(__doc__)
    parser.add_argument("--run", required=True, help=f"'{PRETRAIN}' or a variant name from params.variants")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--stage", default="train", help="stage name, recorded as an MLflow tag")
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    spec = RunSpec(args.run, args.seed)
    out = Path("models") / args.run / f"s{args.seed}"
    init = None if args.run == PRETRAIN else Path("models") / PRETRAIN / f"s{args.seed}" / "model.pt"
    result = train_run(
        params, spec,
        out_dir=out,
        log_csv=Path("logs") / args.run / f"s{args.seed}.csv",
        checkpoint_dir=Path("checkpoints") / spec.run_name,
        init_model=init,
        tracking=_common.tracking_config(params),
        tags=_common.tags(params, args.stage, args.run, args.seed),
        progress=not args.no_progress,
    )
    print(json.dumps({"run": spec.run_name, **result}))


if __name__ == "__main__":
    main()
