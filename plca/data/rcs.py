"""Rare class sampling (RCS; DAFormer, Hoyer et al. CVPR 2022, `mmseg/datasets/uda_dataset.py`, as released).

The pixel count of each class in each source label (full resolution, train ids, 255 excluded) is computed once
(`class_pixel_counts`, stored as JSON by a pipeline stage). From the totals n_c: freq = n / sum n and
P(c) = softmax((1 - freq) / T), T = 0.01, classes by ascending count (`rcs_probabilities`). Each source sample then
draws c ~ P, an image uniformly among those with more than `min_pixels` pixels of c, and re-crops it until the
crop holds more than `min_crop_pixels` pixels of c (`RCSDataset`); the stream's item index is ignored.

Unlike the rest of `plca.data` this module needs torch (`rcs_probabilities` returns a tensor, `RCSDataset` is a
`plca.engine.streams.KeyedDataset`); `plca.data` re-exports `rcs_probabilities` lazily so that importing the
package stays torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from plca.engine.streams import Key, KeyedDataset

log = logging.getLogger(__name__)


def rcs_probabilities(class_pixel_counts: Mapping[int, int],
                      temperature: float = 0.01) -> tuple[list[int], torch.Tensor]:
    """Class -> total pixel count -> (classes by ascending count, ties by id; float32 [K] sampling probabilities).

    DAFormer `get_rcs_class_probs`: freq = n / sum n (an int64 tensor divided: float32), P = softmax((1 - freq) / T)
    in float32, in the order of the returned classes. Only the classes of the mapping are sampled (the released
    statistics list only classes present in some image). The release sorts ties in first-seen order; here by id.
    """
    if not temperature > 0:
        raise ValueError(f"rcs_probabilities: temperature must be > 0, got {temperature}")
    counts = {int(c): int(n) for c, n in class_pixel_counts.items()}
    if not counts:
        raise ValueError("rcs_probabilities: no class counts given")
    negative = {c: n for c, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"rcs_probabilities: negative pixel counts {negative}")
    classes = sorted(counts, key=lambda c: (counts[c], c))
    n = torch.tensor([counts[c] for c in classes], dtype=torch.int64)
    if int(n.sum()) == 0:
        raise ValueError("rcs_probabilities: every class count is 0")
    freq = n / n.sum()
    return classes, torch.softmax((1 - freq) / temperature, dim=-1).to(torch.float32)


def class_totals(counts: Sequence[Mapping[int, int]]) -> dict[int, int]:
    """Class -> pixels over every image of per-image counts (`class_pixel_counts`)."""
    totals: dict[int, int] = {}
    for image in counts:
        for c, n in image.items():
            totals[c] = totals.get(c, 0) + n
    return totals


def class_pixel_counts(reader: Any, num_classes: int = 19, ignore_index: int = 255,
                       progress: bool = False) -> list[dict[int, int]]:
    """Per item of `reader` (`len(reader)`, `reader.read(i).label` uint8 [H, W] train ids) the pixel count of each
    class present in its label, {class: count} with count > 0 and `ignore_index` excluded (DAFormer's
    `sample_class_stats.json`, computed on the full-resolution labels). A value outside [0, num_classes) other than
    `ignore_index` raises ValueError naming the item."""
    counts = []
    with tqdm(total=len(reader), desc="class pixel counts", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(len(reader)):
            sample = reader.read(i)
            if sample.label is None:
                raise ValueError(f"class_pixel_counts: item {i} ({sample.name}) has no label")
            values = np.asarray(sample.label).ravel().astype(np.int64)
            if values.size and values.min() < 0:
                raise ValueError(f"class_pixel_counts: item {i} ({sample.name}) has negative label values")
            bins = np.bincount(values, minlength=num_classes)
            bad = [int(v) for v in np.flatnonzero(bins[num_classes:]) + num_classes if v != ignore_index]
            if bad:
                raise ValueError(f"class_pixel_counts: item {i} ({sample.name}) has label values {bad[:10]} outside "
                                 f"[0, {num_classes}) and not {ignore_index}")
            counts.append({int(c): int(bins[c]) for c in range(num_classes) if bins[c] > 0})
            bar.update(1)
    return counts


@dataclass
class RCSConfig:
    """DAFormer's `rare_class_sampling` settings (its values for 512 x 512 crops; scale the pixel thresholds by
    the crop area for other crops).

    temperature: T of the class softmax (class_temp). min_pixels: an image qualifies for class c with more than
    this many pixels of c (full-resolution counts). min_crop_pixels: re-crop until the crop holds more than this
    many pixels of c (min_pixels x min_crop_ratio 0.5). max_tries: how many times the crop is checked (and redone
    after a failed check); the release's `range(10)`, so up to max_tries + 1 crops, the last one kept unchecked.
    """

    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_pixels: int = 1500
    max_tries: int = 10

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"RCSConfig: temperature must be > 0, got {self.temperature}")
        if self.min_pixels < 0:
            raise ValueError(f"RCSConfig: min_pixels must be >= 0, got {self.min_pixels}")
        if self.min_crop_pixels < 0:
            raise ValueError(f"RCSConfig: min_crop_pixels must be >= 0, got {self.min_crop_pixels}")
        if isinstance(self.max_tries, bool) or not isinstance(self.max_tries, int) or self.max_tries < 0:
            raise ValueError(f"RCSConfig: max_tries must be an int >= 0, got {self.max_tries!r}")


class RareClassSampler:
    """Draws (class, image index) pairs from per-image class pixel counts (`class_pixel_counts`; JSON's string
    keys are accepted).

    Totals over the images give P (`rcs_probabilities`); per class the qualifying images are those with more than
    `min_pixels` pixels of it. A class without any qualifying image is dropped from the distribution and the rest
    renormalised (the release asserts that none is; `dropped` lists them); ValueError if no class qualifies.
    """

    def __init__(self, counts: Sequence[Mapping[int | str, int]], config: RCSConfig | None = None) -> None:
        self.config = config or RCSConfig()
        per_image = [{int(c): int(n) for c, n in image.items()} for image in counts]
        totals = {c: n for c, n in class_totals(per_image).items() if n > 0}
        if not totals:
            raise ValueError(f"RareClassSampler: no class has any pixel in the {len(per_image)} images")
        self.totals = totals
        all_classes, probs = rcs_probabilities(totals, self.config.temperature)
        self.all_classes, self.all_probabilities = all_classes, probs
        images = {c: np.asarray([i for i, image in enumerate(per_image) if image.get(c, 0) > self.config.min_pixels],
                                dtype=np.int64) for c in all_classes}
        keep = [j for j, c in enumerate(all_classes) if len(images[c])]
        self.dropped = [c for c in all_classes if not len(images[c])]
        if not keep:
            raise ValueError(f"RareClassSampler: no image has more than {self.config.min_pixels} pixels of any class")
        if self.dropped:
            log.warning("rare class sampling: classes %s have no image with more than %d pixels of them; dropped",
                        self.dropped, self.config.min_pixels)
        self.classes = [all_classes[j] for j in keep]
        p = probs.double().numpy()[keep]
        self.probabilities = p / p.sum()
        self.images = {c: images[c] for c in self.classes}

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """c ~ P (`rng.choice` with p), then an image uniformly among those qualifying for c."""
        c = int(rng.choice(self.classes, p=self.probabilities))
        return c, int(rng.choice(self.images[c]))


class RCSDataset(KeyedDataset):
    """A `KeyedDataset` whose items are drawn by rare class sampling; the key's item index is ignored (as
    released: DAFormer's `get_rare_class_sample` never reads it).

    Key (index, k): rng = default_rng([seed, stream_id, k]); (c, i) = sampler.draw(rng); item i is read and
    transformed with the same rng, continuing; while the crop label holds at most `min_crop_pixels` pixels of c,
    up to `max_tries` times, the transform is redone (a new crop). Deterministic in (seed, stream_id, k), so a
    resumed run sees the same batches.
    """

    def __init__(self, reader: Any, transform: Callable[..., tuple[np.ndarray, np.ndarray | None]], seed: int,
                 stream_id: int, sampler: RareClassSampler) -> None:
        super().__init__(reader, transform, seed, stream_id)
        self.sampler = sampler

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        _, k = key
        rng = np.random.default_rng([self.seed, self.stream_id, k])
        c, index = self.sampler.draw(rng)
        sample = self.reader.read(index)
        if sample.label is None:
            raise ValueError(f"RCSDataset: item {index} ({sample.name}) has no label; RCS needs a labelled stream")
        image, label = self.transform(sample, rng)
        for _ in range(self.sampler.config.max_tries):
            if int((np.asarray(label) == c).sum()) > self.sampler.config.min_crop_pixels:
                break
            image, label = self.transform(sample, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label)).long()}
