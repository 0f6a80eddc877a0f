"""Prediction, optionally with PLCA's test-time aggregation (Sec. 3.5), and evaluation over a reader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from plca.data.transforms import TransformConfig, eval_transform
from plca.evaluation.metrics import ConfusionMatrix
from plca.losses import spatial_aggregate
from plca.losses.constants import DEFAULT_ALPHA
from plca.models.output import FEATURES, LOGITS, class_argmax


@dataclass
class InferenceConfig:
    #: Aggregate features (cosine, CN-softmax) before the classifier and probabilities (KL weights) after it.
    test_time_aggregation: bool = False
    alpha: float = DEFAULT_ALPHA
    #: Network input size (w, h) the image is resized to; None = as stored. Predictions go back to label size.
    input_size: tuple[int, int] | None = None
    batch_size: int = 8


@torch.no_grad()
def predict_probs(model: Any, images: torch.Tensor, out_size: tuple[int, int], cfg: InferenceConfig) -> torch.Tensor:
    """[N, 3, h, w] normalised images -> [N, C, H, W] class probabilities at `out_size` (bilinear)."""
    out = model(images)
    if cfg.test_time_aggregation:
        features = spatial_aggregate(out[FEATURES].float(), similarity="cosine", alpha=cfg.alpha, impl="auto")
        probs = model.classify(features).float().softmax(1)
        probs = spatial_aggregate(probs, similarity="kl", alpha=cfg.alpha, impl="auto")
    else:  # logits only: an ensemble has no feature map
        probs = out[LOGITS].float().softmax(1)
    return model.upsample(probs, out_size)


@dataclass
class EvalResult:
    matrix: ConfusionMatrix
    #: index -> (name, [H, W] uint8 train-id prediction) for the indices asked to keep.
    kept: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)


def read_labelled(reader: Any, index: int, tcfg: TransformConfig, size: tuple[int, int] | None,
                  needs: str = "evaluation needs") -> tuple[np.ndarray, np.ndarray, str]:
    """Item `index` of `reader` as (network input, label, name); an error names the reader and the item when it
    has no label (`needs` says who asked)."""
    sample = reader.read(index)
    if sample.label is None:
        raise ValueError(f"{reader.root}: {needs} labels, but item {sample.name} has none")
    image, label = eval_transform(sample, tcfg, size)
    return image, label, sample.name


def _batches(reader: Any, tcfg: TransformConfig, cfg: InferenceConfig) -> Iterator[list[tuple[int, Any, Any, str]]]:
    """Consecutive samples whose network input and label shapes agree, up to batch_size at a time."""
    batch: list[tuple[int, Any, Any, str]] = []
    for i in range(len(reader)):
        image, label, name = read_labelled(reader, i, tcfg, cfg.input_size)
        if batch and (image.shape != batch[0][1].shape or label.shape != batch[0][2].shape
                      or len(batch) == cfg.batch_size):
            yield batch
            batch = []
        batch.append((i, image, label, name))
    if batch:
        yield batch


def evaluate(
    model: torch.nn.Module,
    reader: Any,
    tcfg: TransformConfig,
    cfg: InferenceConfig,
    device: torch.device,
    keep: tuple[int, ...] = (),
    progress: bool = True,
    desc: str = "evaluate",
    on_batch: Callable[[int], None] | None = None,
    on_prediction: Callable[[str, np.ndarray], None] | None = None,
) -> EvalResult:
    """Confusion matrix of `model` over every labelled item of `reader`; keeps the predictions of `keep` and hands
    every prediction (name, [H, W] uint8 train ids) to `on_prediction`."""
    model.eval()
    matrix = ConfusionMatrix()
    result = EvalResult(matrix)
    with tqdm(total=len(reader), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(reader, tcfg, cfg):
            images = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
            labels = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
            pred = class_argmax(predict_probs(model, images, tuple(labels.shape[-2:]), cfg))
            matrix.update(pred, labels)
            for (i, _, _, name), p in zip(batch, pred, strict=True):
                if i in keep or on_prediction is not None:
                    p = p.to(torch.uint8).cpu().numpy()
                if i in keep:
                    result.kept[i] = (name, p)
                if on_prediction is not None:
                    on_prediction(name, p)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(len(batch))
    return result
