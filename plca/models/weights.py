"""Reading ImageNet weights files: what every backbone's loader shares (ResNet's torchvision files, MiT's
SegFormer files): the file read as a flat name -> tensor mapping, and a key-by-key fit check whose error lists what
differs and what the file should have been."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor


class WeightsError(ValueError):
    """A weights file does not fit the backbone (missing/unexpected keys or shape mismatches)."""


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_state_dict(path: Path, what: str, need: str) -> dict[str, Tensor]:
    """The flat state_dict in `path` (`what`: e.g. "ImageNet weights"); errors name the file and `need`."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path.resolve()}: need {need}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets the same clear message
        raise WeightsError(f"{path}: not a readable torch state_dict ({exc}); need {need}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        wrapped = isinstance(state, dict) and "state_dict" in state
        hint = " (it looks like a training checkpoint: save its 'state_dict' entry)" if wrapped else ""
        raise WeightsError(f"{path}: expected a flat mapping of name -> tensor{hint}; need {need}")
    return state


def check_fit(path: Path, expected: Mapping[str, Tensor], kept: Mapping[str, Tensor], title: str, need: str) -> None:
    """Raise WeightsError unless `kept` (the file's entries to load) has exactly the keys and shapes of
    `expected` (the model's state_dict); the message starts with `title` and ends with `need`. Keys are listed in
    the model's (or the file's) order, so the first ones are the stem's."""
    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    mismatched = [f"{k} file {tuple(kept[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in kept and kept[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{path}: {title}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched, 4)}")
        parts.append(f"need {need}")
        raise WeightsError("; ".join(parts))
