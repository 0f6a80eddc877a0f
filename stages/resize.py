"""DVC stage: pre-resize one dataset (gta5, synthia or cityscapes) from <resize.in_dir>/<dataset> into
<resize.out_dir>/<dataset>, same layout, with the `resize` section of params.yaml
(plca.data.resize.ResizeParams), in parallel worker processes."""

from __future__ import annotations

import sys

from _cli import setup

from plca.config import ConfigError, from_dict, load_yaml
from plca.data.resize import ResizeError, ResizeParams, resize_dataset
from plca.data.verify import LAYOUTS

SECTION = "resize"


def main(argv: list[str] | None = None) -> int:
    parser = setup(__doc__)
    parser.add_argument("dataset", choices=LAYOUTS, help="dataset: its folder under resize.in_dir, named as its layout")
    args = parser.parse_args(argv)
    try:
        params = from_dict(ResizeParams, load_yaml(args.params).get(SECTION) or {}, SECTION)
        if args.no_progress:
            params.progress = False
        src, dst = params.in_dir / args.dataset, params.out_dir / args.dataset
        report = resize_dataset(src, dst, args.dataset, params, params.splits.get(args.dataset))
    except (ConfigError, ResizeError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.dataset}: {report.pairs} pairs resized to short edge {params.short_edge} in {report.root} "
          f"({len(report.label_size_fixed)} labels brought to their image's size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
