"""Atomic file writers (every output of the package is written whole or not at all), and image reading/writing.

A writer fills a temporary file in the target's folder (same file system, so the rename is atomic), fsyncs it,
makes it readable by anyone (mkstemp creates owner-only files) and renames it over the target. On any exception
the temporary file is removed and the previous target, if any, stays as it was.

Images are read and written only through `read_image` and `write_image`: they pass bytes to cv2.imdecode and
cv2.imencode and never a file name to OpenCV, whose imread/imwrite crash the process (a segfault, no message) on
a name that is not valid UTF-8. Such a name (surrogate escapes in Python) is shown in messages by `show_path`.
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
    "ImageError",
    "atomic_dir",
    "atomic_write",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_png",
    "atomic_write_text",
    "encode_image",
    "encode_png",
    "read_image",
    "read_image_or",
    "remove_leftovers",
    "rename",
    "show_path",
    "write_image",
]


class ImageError(ValueError):
    """A file that cannot be decoded as an image (corrupt, truncated, empty or another format); names the file."""


def show_path(path: os.PathLike[str] | os.PathLike[bytes] | str | bytes) -> str:
    """`path` as printable text: str(path) for a name that is valid UTF-8; otherwise each byte that is not
    shows as a backslash escape (the byte 0xff as the four characters \\xff), so that a message naming the file
    can be printed, logged or written to a UTF-8 file (os.fsdecode's lone surrogates raise there)."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte gave: escape it as it is
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
    """Remove the temporary files a killed `atomic_write` of `path` left beside it, and the temporary folders of
    a killed `atomic_dir` (`.<name>.*.tmp`); returns them. Called before a run writes `path` again."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    for tmp in stale:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
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


def encode_image(image: np.ndarray, ext: str = ".png", params: Sequence[int] = ()) -> bytes:
    """The bytes cv2.imwrite writes for a path ending in `ext` (".png", ".jpg" ...; image in OpenCV's channel
    order; params as cv2.imwrite's). ValueError if the array cannot be stored in that format."""
    import cv2  # not at module level: the package's JSON and text writers must not need OpenCV

    what = f"cannot encode an array of shape {image.shape} and dtype {image.dtype} as {ext.lstrip('.').upper()}"
    try:
        ok, buf = cv2.imencode(ext, image, list(params))
    except cv2.error as exc:  # e.g. 2 or 5 channels, or no encoder for ext: OpenCV asserts instead of returning False
        raise ValueError(what) from exc
    if not ok:
        raise ValueError(what)
    return buf.tobytes()


def encode_png(image: np.ndarray, params: Sequence[int] = ()) -> bytes:
    """The bytes cv2.imwrite writes for a .png path (image in OpenCV's channel order; params as cv2.imwrite's)."""
    return encode_image(image, ".png", params)


def atomic_write_png(image: np.ndarray, path: Path | str, params: Sequence[int] = ()) -> Path:
    """Write image as PNG atomically: the same bytes as cv2.imwrite(path, image, params). Encoded first, so an
    image that cannot be a PNG (ValueError) leaves no file at all."""
    try:
        data = encode_png(image, params)
    except ValueError as exc:
        raise ValueError(f"{show_path(path)}: {exc}") from exc
    return atomic_write(path, lambda f: f.write(data))


def write_image(path: os.PathLike[str] | str | bytes, image: np.ndarray, params: Sequence[int] = ()) -> Path:
    """cv2.imwrite(path, image, params) for any file name, atomically: the same bytes, in the format of the
    path's suffix; returns the path. Encoded first, so an image that cannot be stored (ValueError naming the
    file) leaves no file at all."""
    path = Path(os.fsdecode(path))
    try:
        data = encode_image(image, path.suffix, params)
    except ValueError as exc:
        raise ValueError(f"{show_path(path)}: {exc}") from exc
    return atomic_write(path, lambda f: f.write(data))


def read_image(path: os.PathLike[str] | str | bytes, flags: int | None = None) -> np.ndarray:
    """cv2.imread(path, flags) for any file name (flags default to cv2.IMREAD_COLOR): the same array, but the
    file is read by Python and decoded from memory, and a file that is not a decodable image raises ImageError
    naming it instead of giving None. A missing or unreadable file raises OSError (which names it too)."""
    import cv2

    path = Path(os.fsdecode(path))
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{show_path(path)}: empty file, not an image")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR if flags is None else flags)
    except cv2.error as exc:  # OpenCV asserts on some inputs instead of returning None
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"{show_path(path)}: cannot decode the image ({reason})") from None
    if image is None:
        raise ImageError(f"{show_path(path)}: cannot decode the image (corrupt, truncated or not an image file?)")
    return image


def read_image_or(error: type[Exception], path: Path, flags: int, what: str) -> np.ndarray:
    """`read_image`, with a file that does not decode or cannot be read raised as `error` naming it and `what`
    it should be (e.g. "label")."""
    try:
        return read_image(path, flags)
    except ImageError:
        raise error(f"{show_path(path)}: cannot decode {what} PNG") from None
    except OSError as exc:
        raise error(f"{show_path(path)}: cannot read: {exc.strerror or exc}") from None
