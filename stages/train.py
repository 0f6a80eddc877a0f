"""DVC stage: train one run for every seed (or the seeds given), one after another in one process — the
source-only pretraining (of params `model`, or `pretrain_<network>` of a network of params `networks`), or
one variant (a round starts from the model and learns from the pseudo-label set its
wiring in params `runs.rounds` names). A run killed at any point resumes from its checkpoint; a seed that had
finished is restored from its final checkpoint instead of retrained. The checkpoints go once every seed is done."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import _common
from _cli import setup

from plca.engine.distributed import barrier, shutdown
from plca.experiment import PRETRAIN, RunSpec, train_run
from plca.params import NETWORK_PRETRAIN


def main() -> None:
    parser = setup(__doc__)
    parser.add_argument("--run", required=True, help=f"'{PRETRAIN}' or a variant name from params.variants")
    _common.add_seed_option(parser)
    parser.add_argument("--stage", default="train", help="stage name, recorded as an MLflow tag")
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    dist = _common.distributed(params, [__file__, *sys.argv[1:]])
    tracking = _common.tracking_config(params)
    specs = [RunSpec(args.run, seed) for seed in (args.seed or params.seeds)]
    wiring = params.runs.rounds.get(args.run)
    network = params.network_of(args.run)
    # the source-only model a variant continues: the shared one, its network's (pretrain_<network>) or its round's
    start = wiring.init if wiring else PRETRAIN if network is None else NETWORK_PRETRAIN + network
    pretraining = params.pretraining(args.run) is not None
    for spec in specs:
        seed = spec.seed
        init = None if pretraining else _common.model_path(start, seed)
        result = train_run(
            params, spec,
            out_dir=Path("models") / args.run / f"s{seed}",
            log_csv=Path("logs") / args.run / f"s{seed}.csv",
            checkpoint_dir=Path("checkpoints") / spec.run_name,
            init_model=init,
            tracking=tracking,
            tags=_common.tags(params, args.stage, args.run, seed),
            progress=not args.no_progress,
            pseudo_dir=_common.pseudo_path(wiring.pseudo, seed) if wiring else None,
            class_stats=None if pretraining else _common.CLASS_STATS,
            dist=dist,
        )
        if dist.main:
            print(json.dumps({"run": spec.run_name, **result}), flush=True)
    barrier()  # no process still reads a checkpoint
    if dist.main:
        for spec in specs:  # every model is saved: the checkpoints have served
            shutil.rmtree(Path("checkpoints") / spec.run_name, ignore_errors=True)
    shutdown()


if __name__ == "__main__":
    main()
