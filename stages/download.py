"""DVC stage: download, extract and verify one real dataset (gta5, synthia or cityscapes) into
<download.out_dir>/<dataset>, with the `download` section of params.yaml (plca.data.download.DownloadParams).

Cityscapes credentials come from CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD or a ~/.netrc entry for
www.cityscapes-dataset.com; they are never read from params nor logged. Without network, put the archives in
download.fetch.manual_dir (or download.fetch.archive_dir): they are verified and used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from _cli import pairs_line, setup

from plca.config import ConfigError, from_dict, load_yaml
from plca.data.download import DownloadError, DownloadParams, download_dataset, load_sources, resolve_credentials
from plca.data.extract import ArchiveError
from plca.data.verify import DatasetError

SECTION = "download"


def main(argv: list[str] | None = None) -> int:
    parser = setup(__doc__)
    parser.add_argument("dataset", help="dataset name in the sources file: gta5, synthia or cityscapes")
    args = parser.parse_args(argv)
    try:
        params = from_dict(DownloadParams, load_yaml(args.params).get(SECTION) or {}, SECTION)
        if args.no_progress:
            params.fetch.progress = params.verify.progress = False
        sources = load_sources(params.sources)
        if args.dataset not in sources:
            raise ConfigError(f"unknown dataset {args.dataset!r}; the sources file lists {sorted(sources)}")
        source = sources[args.dataset]
        credentials = None
        if source.auth is not None:  # the one place that reads the environment and ~/.netrc
            credentials = resolve_credentials(source.auth, os.environ, Path.home() / ".netrc")
        report = download_dataset(args.dataset, source, params, credentials)
    except (ConfigError, DownloadError, ArchiveError, DatasetError) as exc:
        sys.exit(f"error: {exc}")
    print(pairs_line(args.dataset, report.root, report.counts,
                     f"{len(report.size_mismatches)} image/label size mismatches"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
