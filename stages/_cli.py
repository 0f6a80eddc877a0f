"""The command line every stage shares, without importing torch (the data stages start in a fraction of a second).

Imported before anything imports `plca` (`_common` imports it first): it puts this repository's root first on
sys.path, so a stage runs the `plca` beside it. The editable install points at one checkout; a queued
`dvc exp run` (a copy under .dvc/tmp/exps) or a test's copy of the repository must run its own code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not sys.path or sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))


def setup(description: str | None) -> argparse.ArgumentParser:
    """Logging plus a parser with the options every stage takes: --params and --no-progress."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def pairs_line(name: str, root: Path, counts: Mapping[str, int], note: str) -> str:
    """One dataset's summary line: where it is, image/label pairs per split, and a note."""
    per_split = ", ".join(f"{split}: {n}" for split, n in counts.items())
    return f"{name}: {root} ({per_split} image/label pairs; {note})"
