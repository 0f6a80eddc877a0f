"""DVC stage: prepare the data into data.root. The default profile generates the embedded domain pair in the
GTA5 and Cityscapes on-disk formats; the paper profiles (the overlays profiles/gta5.yaml, profiles/synthia.yaml,
selected with `python -m plca.profile gta5`) download, verify and pre-resize the real datasets named in
data.prepare (plca.data.prepare).

Cityscapes credentials come from CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD or a ~/.netrc entry for
www.cityscapes-dataset.com; they are never read from params nor logged. Without network, put the archives in
data.prepare.download.fetch.manual_dir: they are verified and used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _common
from _cli import pairs_line, setup

from plca.config import ConfigError, load_yaml
from plca.data.download import DownloadError, load_sources
from plca.data.extract import ArchiveError
from plca.data.prepare import check_domain_roots, credentials_for, prepare_datasets
from plca.data.resize import ResizeError
from plca.data.verify import DatasetError
from plca.profiles import overlay_file, profile_names

#: The overlays `python -m plca.profile` merges onto the default, named <name>.yaml (relative to the repository root).
PROFILES = Path("profiles")


def _sets_real_data(name: str, root: Path) -> bool:
    """Whether the overlay `name` of a profile key switches to the real datasets (sets data.prepare)."""
    try:
        _, path = overlay_file(name, root / PROFILES)
        data = load_yaml(path if path.is_absolute() else root / path).get("data")
    except ConfigError:
        return False  # not a readable overlay (e.g. the default's own name): nothing to compare with
    return isinstance(data, dict) and isinstance(data.get("prepare"), dict)


def main(argv: list[str] | None = None) -> int:
    parser = setup(__doc__)
    args = parser.parse_args(argv)
    params = _common.params_or_exit(args.params)
    data = params.data
    progress = not args.no_progress
    if data.embedded is not None and data.prepare is not None:
        sys.exit(f"error: {args.params}: data.embedded and data.prepare are both set; a profile has one of them")
    names = profile_names(params.profile)
    if data.embedded is not None and any(_sets_real_data(n, _common.repo_root()) for n in names):
        # `dvc exp run -S profile=gta5` only relabels the toy params; selecting a profile merges its overlays
        sys.exit(f"error: {args.params}: profile is '{params.profile}' but the params are the embedded toy pair's; "
                 f"select the profile with: python -m plca.profile {' '.join(names)}")
    if data.embedded is not None:
        from plca.data.embedded import generate_pair

        summary = generate_pair(data.root, data.embedded, progress=progress)
        print(json.dumps(summary, default=str)[:2000])
        return 0
    if data.prepare is None:
        sys.exit(f"error: {args.params}: profile '{params.profile}' sets neither data.embedded (the toy pair) nor "
                 "data.prepare (real datasets); see profiles/ and README, 'Reproducing the paper on GPUs'")
    cfg = data.prepare
    if not progress:
        cfg.download.fetch.progress = cfg.download.verify.progress = cfg.resize.progress = False
    try:
        check_domain_roots(data.root, cfg, [data.source.root, data.target.root])
        sources = load_sources(cfg.download.sources)
        # the one place that reads the environment and ~/.netrc for accounts
        credentials = credentials_for(sources, cfg.datasets, os.environ, Path.home() / ".netrc")
        prepared = prepare_datasets(data.root, cfg, credentials)
    except (ValueError, DownloadError, ArchiveError, DatasetError, ResizeError) as exc:
        sys.exit(f"error: {exc}")
    for p in prepared:
        print(pairs_line(p.name, p.root, p.counts, f"{len(p.label_size_fixed)} labels brought to their image's size"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
