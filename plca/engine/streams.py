"""Deterministic training streams: which sample, with which augmentation, each step sees.

A batch is a pure function of (seed, stream, step): sample k of the run (counted over steps, accumulation
micro-batches and batch slots) is item perm_e[k mod N] of epoch e = k // N, where perm_e is a permutation seeded
by (seed, stream, e), and its augmentation RNG is seeded by (seed, stream, k). So a run resumed at step t sees
exactly the batches an uninterrupted run sees, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Key = tuple[int, int]  # (item index, global sample counter k)


class StepBatchSampler(Sampler[list[Key]]):
    """Yields the keys of every micro-batch from `start_step` to `end_step`."""

    def __init__(
        self, num_items: int, batch_size: int, grad_accum: int, seed: int, stream_id: int, start_step: int,
        end_step: int,
    ) -> None:
        if num_items <= 0:
            raise ValueError("a training stream has no items")
        self.n, self.bs, self.accum = num_items, batch_size, grad_accum
        self.seed, self.stream_id = seed, stream_id
        self.start, self.end = start_step, end_step
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(self.n)}
        return self._perm_cache[epoch]

    def keys(self, step: int, micro: int) -> list[Key]:
        first = (step * self.accum + micro) * self.bs
        return [(int(self._perm(k // self.n)[k % self.n]), k) for k in range(first, first + self.bs)]

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start, self.end):
            for micro in range(self.accum):
                yield self.keys(step, micro)

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum


class KeyedDataset(Dataset):
    """Reads item `index` of a reader and augments it with an RNG seeded by (seed, stream, k)."""

    def __init__(self, reader: Any, transform: Callable[..., tuple[np.ndarray, ...]], seed: int,
                 stream_id: int) -> None:
        self.reader, self.transform = reader, transform
        self.seed, self.stream_id = seed, stream_id

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        index, k = key
        rng = np.random.default_rng([self.seed, self.stream_id, k])
        sample = self.reader.read(index)
        image, label, *soft = self.transform(sample, rng)  # soft labels third, when the sample has them
        item = {"image": torch.from_numpy(np.ascontiguousarray(image))}
        if sample.label is not None:  # unlabelled streams carry no label at all
            item["label"] = torch.from_numpy(np.ascontiguousarray(label)).long()
        if soft:
            item["soft_label"] = torch.from_numpy(np.ascontiguousarray(soft[0]))
        return item


def stream_loader(dataset: KeyedDataset, sampler: StepBatchSampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # iter() draws the loader's base seed from this generator instead of torch's global RNG, which a resumed
        # run restores from its checkpoint; samples are seeded by (seed, stream, k) anyway
        generator=torch.Generator(),
    )
