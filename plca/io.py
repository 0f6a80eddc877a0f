"""Atomic file writers: every output of the package is written whole or not at all.

A writer fills a temporary file in the target's folder (same file system, so the rename is atomic), fsyncs it,
makes it readable by anyone (mkstemp creates owner-only files) and renames it over the target. On any exception
the temporary file is removed and the previous target, if any, stays as it was.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

# outputs are meant to be read by anyone (DVC, other users); mkstemp alone gives 0o600
FILE_MODE = 0o644
#: Columns of a CSV log written with no rows (a 0-step run): the two every training log row starts with.
EMPTY_CSV_COLUMNS = ("step", "lr")

__all__ = [
    "EMPTY_CSV_COLUMNS",
    "FILE_MODE",
    "atomic_dir",
    "atomic_write",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_png",
    "atomic_write_text",
    "encode_png",
    "remove_leftovers",
    "rename",
]


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(file) on a temporary binary file beside path, then rename it over path; returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def rename(src: Path | str, dst: Path | str) -> None:
    """Move `src` over `dst` in one step (same file system): a reader sees the old `dst` or `src`, never a mix."""
    os.replace(src, dst)


def remove_leftovers(path: Path | str) -> list[Path]:
    """Remove the temporary files a killed `atomic_write` of `path` left beside it (`.<name>.*.tmp`); returns
    them. Called before a run writes `path` again."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Fill a temporary folder beside `path` in the `with` block; on success it replaces `path` by one rename,
    on any exception it is removed and `path` stays as it was. A folder of many files (a pseudo-label set)
    therefore never looks whole while half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp gives 0o700
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write text as UTF-8 to path atomically (newlines as given: no platform translation)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: Path | str) -> Path:
    """JSON with indent 2, keys in insertion order, and a trailing newline (json.dump's ASCII escapes)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """A CSV table of rows (csv.DictWriter: "\\r\\n" line ends, missing cells empty), columns in order of first
    appearance; with no rows, a header of EMPTY_CSV_COLUMNS alone."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns or list(EMPTY_CSV_COLUMNS), restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def encode_png(image: np.ndarray, params: Sequence[int] = ()) -> bytes:
    """The bytes cv2.imwrite writes for a .png path (image in OpenCV's channel order; params as cv2.imwrite's)."""
    import cv2  # not at module level: the package's JSON and text writers must not need OpenCV

    try:
        ok, buf = cv2.imencode(".png", image, list(params))
    except cv2.error as exc:  # e.g. 2 or 5 channels: OpenCV asserts instead of returning False
        raise ValueError(f"cannot encode an array of shape {image.shape} and dtype {image.dtype} as PNG") from exc
    if not ok:
        raise ValueError(f"cannot encode an array of shape {image.shape} and dtype {image.dtype} as PNG")
    return buf.tobytes()


def atomic_write_png(image: np.ndarray, path: Path | str, params: Sequence[int] = ()) -> Path:
    """Write image as PNG atomically: the same bytes as cv2.imwrite(path, image, params). Encoded first, so an
    image that cannot be a PNG (ValueError) leaves no file at all."""
    try:
        data = encode_png(image, params)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return atomic_write(path, lambda f: f.write(data))
