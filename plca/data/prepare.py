"""Preparation of the real benchmarks for training: download, verify and pre-resize each dataset of a profile.

For every dataset named in the `data.prepare` params section (e.g. gta5 + cityscapes), `plca.data.download`
fetches, extracts and verifies it into `<download.out_dir>/<name>` (kept between runs: a complete copy is
re-verified, not fetched again), then `plca.data.resize` pre-resizes it in worker processes into
`<root>/<name>`, where the readers of `plca.data.datasets` read it. The prepared root is filled in a temporary
folder next to it and renamed into place only when every dataset is done and its counts check out, so an
interrupted run never leaves a root that looks whole.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plca.data.download import (
    Credentials,
    DatasetSource,
    DownloadParams,
    download_dataset,
    load_sources,
    resolve_credentials,
)
from plca.data.extract import replace_dir
from plca.data.resize import ResizeConfig, resize_dataset
from plca.data.verify import DatasetError, VerifyConfig, list_pairs, verify_dataset
from plca.io import atomic_write_text

log = logging.getLogger(__name__)

#: Suffix of the temporary folder the prepared root is assembled in (next to the root).
_STAGING_SUFFIX = ".preparing"
#: File in the prepared root recording what was prepared (datasets, pair counts, short edge).
RECORD = "prepared.json"


@dataclass
class RealDataConfig:
    """The `data.prepare` section: which real datasets to download and how to pre-resize them into data.root."""

    #: Datasets (names in the sources file) prepared into <data.root>/<name>, e.g. [gta5, cityscapes].
    datasets: list[str]
    #: Downloading, extraction and verification (archives, manual folder, raw extracted copies, checksums).
    download: DownloadParams = field(default_factory=DownloadParams)
    #: Pre-resizing of each dataset (short edge, interpolation, worker processes, progress bar).
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    #: {dataset: [split, ...]} to prepare only some splits (Cityscapes: train and val; its test split has no
    #: public labels); a dataset not named here is prepared whole.
    splits: dict[str, list[str]] = field(default_factory=dict)
    #: {dataset: [split, ...]} copied at their stored size instead of resized: Cityscapes val, so evaluation
    #: upsamples to and scores the full-resolution 2048x1024 labels, as the official evaluator does.
    full_size: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"data.prepare.datasets: expected distinct dataset names, got {self.datasets}")
        for key in ("splits", "full_size"):
            unknown = sorted(set(getattr(self, key)) - set(self.datasets))
            if unknown:
                raise ValueError(f"data.prepare.{key}: {unknown} not among data.prepare.datasets {self.datasets}")
        for name, full in self.full_size.items():
            if name not in self.splits:
                raise ValueError(f"data.prepare.full_size.{name} needs data.prepare.splits.{name} (every split to "
                                 "prepare, resized or not)")
            outside = sorted(set(full) - set(self.splits[name]))
            if outside:
                raise ValueError(f"data.prepare.full_size.{name}: {outside} not in data.prepare.splits.{name}")


@dataclass
class PreparedDataset:
    """One dataset as prepared: where it is, how many pairs per split, GTA5's label sizes that were fixed."""

    name: str
    layout: str
    root: Path
    counts: dict[str, int]
    label_size_fixed: list[str] = field(default_factory=list)


def check_domain_roots(root: Path, cfg: RealDataConfig, domain_roots: Iterable[Path]) -> None:
    """Each training domain must read a prepared dataset: its root is <root>/<one of cfg.datasets>."""
    wanted = {Path(root) / name for name in cfg.datasets}
    for d in domain_roots:
        if Path(d) not in wanted:
            raise ValueError(
                f"domain root {d} is not a prepared dataset folder; data.prepare writes "
                f"{', '.join(str(w) for w in sorted(wanted))} (data.root/<dataset>)"
            )


def credentials_for(
    sources: Mapping[str, DatasetSource],
    datasets: Iterable[str],
    environ: Mapping[str, str],
    netrc_file: Path | str | None = None,
) -> dict[str, Credentials | None]:
    """Credentials of every dataset that needs an account (Cityscapes), from `environ` or a netrc file."""
    return {
        name: resolve_credentials(sources[name].auth, environ, netrc_file)
        for name in datasets
        if name in sources and sources[name].auth is not None
    }


def _expected(source: DatasetSource, params: DownloadParams, name: str, splits: list[str] | None) -> dict[str, int]:
    expected = params.expected.get(name, source.expected)
    if splits is not None:
        expected = {s: n for s, n in expected.items() if s in splits}
    return expected


def _copy_splits(src: Path, dst: Path, layout: str, splits: list[str]) -> int:
    """Copy the pairs of `splits` unchanged into `dst` (same relative paths); returns the number of pairs."""
    errors: list[str] = []
    pairs = list_pairs(src, layout, splits, errors)  # type: ignore[arg-type]
    if errors:
        raise DatasetError(f"{src}: cannot copy splits {splits}:\n  " + "\n  ".join(errors[:20]))
    for pair in pairs:
        for f in (pair.image, pair.label):
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
    return len(pairs)


def prepare_datasets(
    root: Path | str,
    cfg: RealDataConfig,
    credentials: Mapping[str, Credentials | None] | None = None,
) -> list[PreparedDataset]:
    """Download, verify and pre-resize every dataset of `cfg` into `<root>/<name>`; `root` appears when complete.

    `credentials` maps a dataset that needs an account to its credentials (see `credentials_for`); they are
    handed to the downloader only, never logged or written. An existing `root` is replaced.
    """
    root = Path(root)
    sources = load_sources(cfg.download.sources)
    unknown = [n for n in cfg.datasets if n not in sources]
    if unknown:
        where = cfg.download.sources or "the packaged plca/data/sources.yaml"
        raise ValueError(f"data.prepare.datasets: {unknown} not in {where} (it lists {sorted(sources)})")
    credentials = credentials or {}

    # Downloads first (each kept in download.out_dir): a missing account or archive stops before any resizing.
    raw = {}
    for name in cfg.datasets:
        raw[name] = download_dataset(name, sources[name], cfg.download, credentials.get(name))

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}{_STAGING_SUFFIX}"
    if staging.exists():
        log.info("removing %s left by an interrupted preparation", staging)
        shutil.rmtree(staging)
    staging.mkdir()
    prepared: list[PreparedDataset] = []
    try:
        for name in cfg.datasets:
            source = sources[name]
            splits = cfg.splits.get(name)
            full = cfg.full_size.get(name, [])
            out = staging / name
            label_size_fixed: list[str] = []
            to_resize = None if splits is None else [s for s in splits if s not in full]
            if to_resize is None or to_resize:
                report = resize_dataset(raw[name].root, out, source.layout, cfg.resize, to_resize)
                label_size_fixed = report.label_size_fixed
            if full:
                n = _copy_splits(raw[name].root, out, source.layout, full)
                log.info("%s: copied %d pairs of %s at their stored size", name, n, ", ".join(full))
            # The resized copy must hold what the verified download held (header-level check: names, counts,
            # readable PNGs of equal image and label size).
            expected = _expected(source, cfg.download, name, splits)
            check = VerifyConfig(check_pixels=False, workers=cfg.download.verify.workers, progress=False)
            verified = verify_dataset(out, source.layout, expected, check)
            if verified.size_mismatches:
                verified.errors.append(f"{out}: image/label sizes still differ for "
                                       f"{sorted(verified.size_mismatches)[:10]}")
            verified.raise_if_failed()
            prepared.append(PreparedDataset(name, source.layout, root / name, dict(verified.counts), label_size_fixed))
        record = {
            "datasets": {p.name: {"layout": p.layout, "pairs": p.counts, "label_size_fixed": p.label_size_fixed}
                         for p in prepared},
            "short_edge": cfg.resize.short_edge,
            "interpolation": cfg.resize.interpolation,
        }
        atomic_write_text(staging / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
        replace_dir(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for p in prepared:
        log.info("%s prepared at %s: pairs %s", p.name, p.root, p.counts)
    return prepared
