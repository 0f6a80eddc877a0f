"""Atomic checkpoint files: a crash mid-write never leaves a truncated checkpoint behind. A training checkpoint
(`save_verified`) also carries its SHA-256 in a file beside it and keeps the previous good one, so a damaged
checkpoint (a flipped bit, a truncated copy) is found on load and the run resumes from the one before."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from plca.io import atomic_write, rename


def atomic_save(obj: Any, path: Path | str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (`plca.io`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: unreadable, or its bytes differ from its recorded checksum."""


def previous(path: Path) -> Path:
    """Where the checkpoint before `path` is kept (`last.pt` -> `last.prev.pt`)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def digest_file(path: Path) -> Path:
    """Where the SHA-256 of checkpoint `path` is kept (`last.pt` -> `last.pt.sha256`)."""
    return path.with_name(f"{path.name}.sha256")


def save_verified(obj: Any, path: Path | str) -> None:
    """Save a training checkpoint: the previous one (with its checksum) moves to `previous(path)`, the new one is
    written atomically, then its SHA-256 beside it. A kill between the two leaves a checkpoint whose checksum does
    not match: `load_verified` refuses it and the previous one serves."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    if path.is_file() and digest_file(path).is_file():
        rename(path, previous(path))
        rename(digest_file(path), digest_file(previous(path)))
    atomic_write(path, lambda fh: fh.write(data))
    atomic_write(digest_file(path), lambda fh: fh.write(hashlib.sha256(data).hexdigest().encode()))


def load_verified(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint `save_verified` wrote, after checking its bytes against its checksum; CheckpointError
    (naming the file and what is wrong) when they differ, the checksum is missing, or torch cannot read it."""
    path = Path(path)
    digest = digest_file(path)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    # a save killed between moving a checkpoint and moving its checksum leaves the pair under different names:
    # the checksum of any checkpoint of this folder vouches for bytes equal to it
    if not any(f.read_text().strip() == actual for f in sorted(path.parent.glob("*.sha256")) if f.is_file()):
        if not digest.is_file():
            raise CheckpointError(f"{path}: no checksum beside it ({digest.name}): written by a killed save")
        raise CheckpointError(f"{path}: its bytes differ from its checksum ({digest.name}): damaged")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None


def source_digest(package: Path | str) -> str:
    """A hash of the source files of a package (every .py and .yaml below it, by relative path and content): a
    checkpoint is resumed only by the code that wrote it."""
    package = Path(package)
    h = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def load(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by `atomic_save` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt file: say which one
        raise RuntimeError(f"{path}: not a readable checkpoint ({exc})") from exc
