"""DVC stage: write one pseudo-label set (params `pseudo.<name>`) for every seed (or the seeds given): the target
train images predicted by the seed's model of the variant params `runs.pseudo.<name>` names, labelled as the set's
policy decides. Each seed's set is written whole or not at all. For the report, its summary and the pseudo-labels
of its first few labelled images are copied to metrics/pseudo/<name>/ (small files, kept in git)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import _common
from _cli import setup

from plca.experiment import pseudo_label_run
from plca.io import atomic_write_json
from plca.labelling import LABELS_DIR, read_names
from plca.params import PSEUDO_METRICS

#: Pseudo-labels per set and seed the report shows (the first labelled images in name order).
REPORT_SAMPLES = 4


def main() -> None:
    parser = setup(__doc__)
    parser.add_argument("--set", required=True, help="a pseudo-label set of params.runs.pseudo")
    _common.add_seed_option(parser)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    labeller = _common.wired(params.runs.pseudo, args.set, "pseudo")
    tracking = _common.tracking_config(params)
    for seed in args.seed or params.seeds:
        summary = pseudo_label_run(
            params, args.set, seed,
            model_path=_common.model_path(labeller, seed),
            out_dir=_common.pseudo_path(args.set, seed),
            tracking=tracking,
            tags=_common.tags(params, "pseudo", args.set, seed),
            progress=not args.no_progress,
            prior_path=_common.SPATIAL_PRIOR,
        )
        out = Path("metrics") / PSEUDO_METRICS / args.set
        atomic_write_json(summary, out / f"s{seed}.json")
        samples = out / f"s{seed}"
        shutil.rmtree(samples, ignore_errors=True)
        samples.mkdir(parents=True)
        labels = _common.pseudo_path(args.set, seed) / LABELS_DIR
        for name in sorted(read_names(_common.pseudo_path(args.set, seed), "labelled"))[:REPORT_SAMPLES]:
            shutil.copyfile(labels / f"{name}.png", samples / f"{name}.png")
        print(json.dumps({"set": args.set, "seed": seed, **{k: summary[k] for k in ("labelled", "unlabelled",
                                                                                  "precision")}}), flush=True)


if __name__ == "__main__":
    main()
