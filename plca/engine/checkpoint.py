"""Atomic checkpoint files: a crash mid-write never leaves a truncated checkpoint behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plca.io import atomic_write


def atomic_save(obj: Any, path: Path | str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (`plca.io`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by `atomic_save` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt file: say which one
        raise RuntimeError(f"{path}: not a readable checkpoint ({exc})") from exc
