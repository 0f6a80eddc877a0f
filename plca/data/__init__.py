"""Datasets: class tables, readers of the real layouts, transforms and the embedded domain pair.

Re-exported here for convenience; every module imports only numpy, cv2 and cityscapesscripts' label table.
"""

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
    "train_transform",
]
