"""Datasets: class tables, readers of the real layouts, transforms and the embedded domain pair.

Re-exported here for convenience; every module imports only numpy, cv2 and cityscapesscripts' label table, except
`plca.data.rcs` (rare class sampling, torch): its `rcs_probabilities` is re-exported lazily, on first access, so that
importing `plca.data` (as the spawned workers of prepare do) does not import torch.
"""

from typing import Any

from plca.data.datasets import CityscapesReader, DataError, GTA5Reader, Sample, SynthiaReader
from plca.data.embedded import EmbeddedConfig, generate_pair
from plca.data.labels import IGNORE_INDEX, NUM_CLASSES, LabelError
from plca.data.transforms import TransformConfig, eval_transform, train_transform

__all__ = [
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "CityscapesReader",
    "DataError",
    "EmbeddedConfig",
    "GTA5Reader",
    "LabelError",
    "Sample",
    "SynthiaReader",
    "TransformConfig",
    "eval_transform",
    "generate_pair",
    "rcs_probabilities",
    "train_transform",
]


def __getattr__(name: str) -> Any:
    if name == "rcs_probabilities":
        from plca.data.rcs import rcs_probabilities

        return rcs_probabilities
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
