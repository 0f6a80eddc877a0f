"""DVC stage: assemble one ensemble variant (params `runs.ensembles.<name>`) for every seed (or the seeds given):
one model file holding the seed's models of its members and their weights, scored by the evaluate stage as one
model that averages their logits."""

from __future__ import annotations

import json
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import RunSpec, ensemble_run


def main() -> None:
    parser = setup(__doc__)
    parser.add_argument("--run", required=True, help="an ensemble variant of params.runs.ensembles")
    _common.add_seed_option(parser)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    members = _common.wired(params.runs.ensembles, args.run, "ensembles").members
    for seed in args.seed or params.seeds:
        meta = ensemble_run(params, RunSpec(args.run, seed),
                            members=[_common.model_path(m, seed) for m in members],
                            out_dir=Path("models") / args.run / f"s{seed}")
        print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main()
