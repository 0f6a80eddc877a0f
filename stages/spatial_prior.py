"""DVC stage: the source's spatial prior for CBST-SP (priors/spatial.npy, [C, h, w] float32, and a preview,
priors/spatial.png): the class frequencies of the source train labels at each location, smoothed (params
`spatial_prior`). Pseudo-label sets with `spatial_prior: true` multiply their class probabilities by it."""

from __future__ import annotations

import json

import _common
from _cli import setup

from plca.experiment import spatial_prior_run


def main() -> None:
    parser = setup(__doc__)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    summary = spatial_prior_run(params, _common.SPATIAL_PRIOR, progress=not args.no_progress)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
