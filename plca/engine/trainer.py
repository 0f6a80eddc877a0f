"""The one training loop: streams in, a method's step, hooks around it.

It knows neither the dataset nor the method: it feeds each stream the method asks for, steps every optimiser the
method declares, and leaves the schedule, the EMA teacher, logging, progress and checkpoints to hooks
(`plca.engine.hooks`). A run killed at any point resumes from its last checkpoint and ends with the same weights as
an uninterrupted run (batches are a function of the step, see `streams.py`; the checkpoint holds every other
state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from plca.engine.contract import Method, TrainContext
from plca.engine.hooks import Hook
from plca.engine.optim import OptimConfig, make_optimizer
from plca.engine.streams import KeyedDataset, StepBatchSampler, stream_loader

log = logging.getLogger(__name__)

STREAM_IDS = {"source": 0, "target": 1}


@dataclass
class EngineConfig:
    """How the engine trains, whatever the run (the `engine` section of params.yaml)."""

    batch_size: int = 8
    #: Micro-batches per optimiser step: batch_size * grad_accum images per stream and step.
    grad_accum: int = 1
    device: str = "auto"
    #: Mixed precision (float16 autocast + gradient scaling) on CUDA; ignored on CPU.
    amp: bool = False
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    #: Torch intra-op threads on CPU (0 = torch's default); applied by the caller before building the model.
    threads: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """One run: its length, seed and (segmenter's) optimiser, on the shared engine settings."""

    steps: int = 1000
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fingerprint(obj: Any) -> str:
    """A stable hash of a run's configuration: a checkpoint is resumed only by the run that wrote it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """The loop and the state hooks see: `method`, `networks`, `optimizers` (name -> optimiser) with their
    `optim_configs`, `scaler`, `device`, `step` (0-based, the step running), `start` (where this process began),
    `total_steps`, and after each step `step_terms` and `lrs`."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.engine.device)
        self.amp = cfg.engine.amp and self.device.type == "cuda"
        if cfg.engine.amp and not self.amp:
            log.info("amp requested but the device is %s: training in float32", self.device)
        self.total_steps = cfg.steps
        self.start = self.step = 0
        self.step_terms: dict[str, float] = {}
        self.lrs: dict[str, float] = {}
        self.hooks: list[Hook] = []

    def _setup(self, method: Method, hooks: Sequence[Hook]) -> None:
        self.method, self.hooks = method, list(hooks)
        self.networks = method.networks()
        for net in self.networks.values():
            net.to(self.device).train()
        self.optim_configs = method.optimizers(self.cfg.optim)
        self.optimizers = {k: make_optimizer(self.networks[k], c) for k, c in self.optim_configs.items()}
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def _batches(self, streams: dict[str, KeyedDataset]) -> Iterator[dict[str, torch.Tensor]]:
        e = self.cfg.engine
        # making a loader draws its base seed from the loader's own generator (streams.stream_loader), never from
        # torch's RNG: a resumed step draws (dropout, a method's mixing) what the uninterrupted step drew
        iters = {
            name: iter(stream_loader(ds, StepBatchSampler(len(ds), e.batch_size, e.grad_accum, self.cfg.seed,
                                                          STREAM_IDS[name], self.start, self.total_steps),
                                     e.num_workers))
            for name, ds in streams.items()
        }

        def draw() -> Iterator[dict[str, torch.Tensor]]:
            while True:
                yield {f"{name}_{key}": value.to(self.device, non_blocking=True)
                       for name, it in iters.items() for key, value in next(it).items()}

        return draw()

    def run_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """One optimiser step of every optimiser over `grad_accum` micro-batches."""
        accum = self.cfg.engine.grad_accum
        self.method.before_step(TrainContext(self.device, self.step, self.total_steps))
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = defaultdict(float)
        for _ in range(accum):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out = self.method.training_step(next(batches))
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"step {self.step}: loss is {out.loss.item()} ({out.terms})")
            self.scaler.scale(out.loss / accum).backward()
            terms["loss"] += float(out.loss.detach()) / accum
            for k, v in out.terms.items():
                terms[k] += v / accum
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        self.step_terms = dict(terms)

    def fit(self, method: Method, streams: dict[str, KeyedDataset], hooks: Sequence[Hook] = ()) -> TrainResult:
        """Train `method` for `cfg.steps` steps on the streams it needs, calling `hooks` around every step."""
        missing = [s for s in method.streams if s not in streams]
        if missing:
            raise ValueError(f"method '{method.name}' needs stream(s) {missing}; given {sorted(streams)}")
        self._setup(method, hooks)
        t0 = time.perf_counter()
        for hook in self.hooks:
            hook.before_train(self)  # the checkpoint hook may move self.start
        batches = self._batches({s: streams[s] for s in method.streams})
        for step in range(self.start, self.total_steps):
            self.step = step
            for hook in self.hooks:
                hook.before_step(self)
            self.run_step(batches)
            for hook in self.hooks:
                hook.after_step(self)
        for hook in self.hooks:
            hook.after_train(self)
        return TrainResult(steps=self.total_steps, resumed_from=self.start, seconds=time.perf_counter() - t0)
