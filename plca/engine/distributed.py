"""Training on several processes (one per GPU, or CPU processes on the gloo backend), started by torchrun.

The stage reads torchrun's variables and opens the process group (`stages/_common.py`); the engine gets a
`DistConfig`. Each optimiser step, every rank takes its contiguous share of each micro-batch of both streams, so
that the global batch of N ranks is the one-process batch of the same seed and step; after the backward passes the
gradients of every trained network are averaged over the ranks (one all-reduce per bucket of about 25 MB, after
the backward: DistributedDataParallel's result, without its overlap of communication and backward), so every rank
steps to the same weights. The logged terms are averaged too. Only rank 0 writes checkpoints, logs, the model and
MLflow runs; every rank resumes from rank 0's checkpoint.

A loss normalised over its batch (a mean over labelled pixels, over the associations' positives, Lovasz-softmax)
is normalised over the rank's share by default (`engine.normalise: rank`), as DistributedDataParallel and the
released codes do: equal to the one-process loss only when the ranks hold equal counts. With `normalise: global` a
method that supports it (`Method.reducer`) scales each mean by its share of the global count (`Reducer.share`) and
computes Lovasz-softmax on the gathered global batch (`Reducer.gather`), so N processes step as one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

#: Gradients are averaged in flat buckets of at most this many bytes.
BUCKET_BYTES = 25 << 20


@dataclass(frozen=True)
class DistConfig:
    """This process's place among the training processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size}: expected 0 <= rank < world size")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this process writes (checkpoints, logs, the model, MLflow)."""
        return self.rank == 0


class ShardSampler(Sampler[list]):
    """Rank `rank`'s contiguous share of every micro-batch of a batch sampler (equal shares)."""

    def __init__(self, sampler: Sampler[list], dist: DistConfig) -> None:
        self.sampler, self.dist = sampler, dist

    def __iter__(self) -> Iterator[list]:
        for keys in self.sampler:
            share = len(keys) // self.dist.world_size
            yield keys[self.dist.rank * share:(self.dist.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the ranks. A parameter that has a gradient on some rank
    counts as zeros on a rank where it has none, so every rank reduces the same tensors in the same order; one
    that has none on any rank keeps none, as in one process (an optimiser then leaves it alone: no weight decay)."""
    import torch.distributed as dist

    params = list(params)
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                            device=params[0].device if params else "cpu")
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads = []
    for p, anywhere in zip(params, has_grad.tolist(), strict=True):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def average_terms(terms: dict[str, float], device: torch.device, world_size: int) -> dict[str, float]:
    """The mean over the ranks of each logged term (every rank logs the same keys)."""
    import torch.distributed as dist

    keys = list(terms)  # the step's own order (the same on every process): the log's columns stay as one process's
    values = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world_size).tolist(), strict=True))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Wait for every process, then close the process group (closing with collectives in flight aborts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Reducer:
    """How a method normalises its batch means: over this process's share (the default, and one process), or
    over the global batch of all processes (`engine.normalise: global`)."""

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size

    @property
    def global_(self) -> bool:
        return self.world_size > 1

    def share(self, count: int | float | torch.Tensor) -> float:
        """The factor that turns a mean over this process's `count` items into its part of the mean over all
        processes' items: count x N / (global count). The processes' gradients are averaged, so the factors make
        the average the gradient of the global mean. 1 for one process."""
        if not self.global_:
            return 1.0
        import torch.distributed as dist

        local = float(count)
        total = torch.tensor([local], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        return local * self.world_size / max(float(total.item()), 1.0)

    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor concatenated over the processes along dim 0 (equal shares), differentiably: a loss of the
        gathered batch, computed alike on every process, sends each its part of the gradient times N, which the
        averaging of gradients divides back. As given for one process."""
        if not self.global_:
            return tensors
        from torch.distributed.nn.functional import all_gather

        return tuple(_ContiguousGrad.apply(torch.cat(all_gather(t.contiguous()))) if t.requires_grad
                     else _gather_plain(t) for t in tensors)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: all_gather's backward on gloo sends the
    slices of that gradient as raw memory, and a loss that permutes its input (Lovasz-softmax flattens
    [N, C, H, W] to [NHW, C]) hands back a permuted one (measured: wrong gradients without this)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad.contiguous()


def _gather_plain(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


#: One process, or processes that each normalise their own share.
LOCAL = Reducer()
