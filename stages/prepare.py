"""DVC stage: prepare the data. The default profile generates the embedded domain pair in the GTA5 and
Cityscapes on-disk formats; the paper profiles download, verify and resize the real datasets instead."""

from __future__ import annotations

import json

import _common

from plca.data.embedded import generate_pair


def main() -> None:
    parser = _common.setup(__doc__)
    args = parser.parse_args()
    params = _common.params_or_exit(args.params)
    if params.data.embedded is None:
        raise SystemExit(
            f"error: profile '{params.profile}' has no embedded pair to generate; "
            "run the download and resize stages for real datasets (see README, 'Reproducing the paper on GPUs')"
        )
    summary = generate_pair(params.data.root, params.data.embedded, progress=not args.no_progress)
    print(json.dumps(summary, default=str)[:2000])


if __name__ == "__main__":
    main()
