"""DVC stage: score one trained variant/seed on target val (and source val)."""

from __future__ import annotations

import json
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import RunSpec, evaluate_run


def main() -> None:
    parser = setup(__doc__)
    parser.add_argument("--run", required=True, help="a variant name from params.variants")
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    spec = RunSpec(args.run, args.seed)
    result = evaluate_run(
        params, spec,
        model_path=Path("models") / args.run / f"s{args.seed}" / "model.pt",
        out_dir=Path("eval") / args.run / f"s{args.seed}",
        metrics_path=Path("metrics") / args.run / f"s{args.seed}.json",
        tracking=_common.tracking_config(params),
        tags=_common.tags(params, "evaluate", args.run, args.seed),
        progress=not args.no_progress,
    )
    print(json.dumps({k: result[k] for k in ("variant", "seed", "miou", "source_val_miou")}))


if __name__ == "__main__":
    main()
