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
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from plca.engine.contract import Method, TrainContext
from plca.engine.distributed import DistConfig, Reducer, ShardSampler, average_gradients, average_terms
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
    #: Mixed precision (float16 autocast + gradient scaling) on CUDA; ignored on CPU. The same as
    #: `precision: fp16`, kept for the params written before `precision` existed.
    amp: bool = False
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    #: Torch intra-op threads on CPU (0 = torch's default); applied by the caller before building the model.
    threads: int = 0
    #: The training step's arithmetic: "fp32"; "bf16" (bfloat16 autocast, no scaler; CUDA or CPU); "fp16"
    #: (float16 autocast with gradient scaling, CUDA only, else float32). The feature association always computes
    #: in float32 (plca.losses.association turns autocast off around its kernels).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: CUDA: TensorFloat-32 matrix products and convolutions (Ampere and later; ~10-bit mantissa in products).
    tf32: bool = False
    #: Networks and images in channels-last memory layout (faster convolutions on tensor cores).
    channels_last: bool = False
    #: CUDA: let cuDNN pick the fastest convolution algorithms for the input shapes (not bitwise reproducible).
    cudnn_benchmark: bool = False
    #: Compile each trained network with torch.compile (in place; the first steps pay the compilation).
    compile: bool = False
    #: Training processes on this machine (one per GPU): more than 1 runs the training stages under torchrun
    #: (`batch_size` is then the global batch, split evenly over all processes of all machines).
    processes: int = 1
    #: Several processes: BatchNorm statistics over the global batch (torch.nn.SyncBatchNorm; CUDA only).
    sync_batchnorm: bool = False
    #: Several processes: batch means (CE over labelled pixels, the associations over their positives,
    #: Lovasz-softmax) over each process's share ("rank": DistributedDataParallel's and the released codes'
    #: behaviour) or over the global batch ("global": as one process; a method that supports it, see
    #: plca.engine.distributed.Reducer).
    normalise: Literal["rank", "global"] = "rank"

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "log_every", "checkpoint_every", "processes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.normalise not in ("rank", "global"):
            raise ValueError(f"normalise must be 'rank' or 'global', got {self.normalise!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.amp and self.precision == "bf16":
            raise ValueError("amp (float16) and precision bf16 contradict each other: set precision alone")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype asked for (None: float32), `amp` counting as fp16."""
        return PRECISIONS["fp16" if self.amp else self.precision]

    def fingerprint_dict(self) -> dict[str, Any]:
        """What a run's fingerprint holds of these settings: the switches added after the first runs only when
        they differ from their defaults, so the fingerprints (and model files) of those runs stay as they were."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _LATER_SWITCHES or getattr(self, f.name) != f.default}


#: precision -> autocast dtype (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LATER_SWITCHES = ("precision", "tf32", "channels_last", "cudnn_benchmark", "compile", "processes",
                   "sync_batchnorm", "normalise")


@dataclass
class TrainConfig:
    """One run: its length, seed and (segmenter's) optimiser, on the shared engine settings."""

    steps: int = 1000
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: This process among several (torchrun); one process by default.
    dist: DistConfig = field(default_factory=DistConfig)


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
        e = cfg.engine
        self.dist = cfg.dist
        if e.batch_size % self.dist.world_size:
            raise ValueError(f"engine.batch_size {e.batch_size} does not split evenly over {self.dist.world_size} "
                             "processes: make it a multiple of the number of processes")
        self.device = resolve_device(e.device)
        if self.device.type == "cuda" and self.dist.active:
            self.device = torch.device("cuda", self.dist.local_rank)
        cuda = self.device.type == "cuda"
        dtype = e.autocast_dtype
        if dtype == torch.float16 and not cuda:
            log.info("float16 mixed precision asked for, but the device is %s: training in float32", self.device)
            dtype = None
        #: the autocast dtype of the step (None: float32); float16 alone needs the gradient scaler
        self.autocast_dtype = dtype
        self.amp = dtype == torch.float16
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = e.tf32
            torch.backends.cudnn.benchmark = e.cudnn_benchmark
        self.memory_format = torch.channels_last if e.channels_last else torch.contiguous_format
        self.total_steps = cfg.steps
        self.start = self.step = 0
        self.step_terms: dict[str, float] = {}
        self.lrs: dict[str, float] = {}
        self.hooks: list[Hook] = []

    def _setup(self, method: Method, hooks: Sequence[Hook]) -> None:
        self.method, self.hooks = method, list(hooks)
        if self.dist.active and self.cfg.engine.normalise == "global":
            method.reducer = Reducer(self.dist.world_size)
        self.networks = method.networks()
        if self.dist.active and self.cfg.engine.sync_batchnorm:
            for net in self.networks.values():
                _sync_batchnorm_(net)
        for net in self.networks.values():
            net.to(self.device, memory_format=self.memory_format).train()
            if self.cfg.engine.compile:
                net.compile()  # in place: the method's references to it stay valid
        self.optim_configs = method.optimizers(self.cfg.optim)
        self.optimizers = {k: make_optimizer(self.networks[k], c) for k, c in self.optim_configs.items()}
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def _batches(self, streams: dict[str, KeyedDataset]) -> Iterator[dict[str, torch.Tensor]]:
        e = self.cfg.engine
        # making a loader draws its base seed from the loader's own generator (streams.stream_loader), never from
        # torch's RNG: a resumed step draws (dropout, a method's mixing) what the uninterrupted step drew
        def sampler(ds: KeyedDataset, name: str) -> Any:
            steps = StepBatchSampler(len(ds), e.batch_size, e.grad_accum, self.cfg.seed, STREAM_IDS[name],
                                     self.start, self.total_steps)
            return ShardSampler(steps, self.dist) if self.dist.active else steps

        iters = {name: iter(stream_loader(ds, sampler(ds, name), e.num_workers)) for name, ds in streams.items()}

        def draw() -> Iterator[dict[str, torch.Tensor]]:
            while True:
                yield {f"{name}_{key}": self._to_device(value) for name, it in iters.items()
                       for key, value in next(it).items()}

        return draw()

    def _to_device(self, value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 4 and value.is_floating_point():  # images: in the networks' memory layout
            return value.to(self.device, memory_format=self.memory_format, non_blocking=True)
        return value.to(self.device, non_blocking=True)

    def run_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """One optimiser step of every optimiser over `grad_accum` micro-batches."""
        accum = self.cfg.engine.grad_accum
        self.method.before_step(TrainContext(self.device, self.step, self.total_steps))
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = defaultdict(float)
        for _ in range(accum):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                out = self.method.training_step(next(batches))
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"step {self.step}: loss is {out.loss.item()} ({out.terms})")
            self.scaler.scale(out.loss / accum).backward()
            terms["loss"] += float(out.loss.detach()) / accum
            for k, v in out.terms.items():
                terms[k] += v / accum
        if self.dist.active:  # every rank steps with the gradient of the global batch
            average_gradients([p for opt in self.optimizers.values() for group in opt.param_groups
                               for p in group["params"]], self.dist.world_size)
            terms = average_terms(terms, self.device, self.dist.world_size)
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


def _sync_batchnorm_(net: torch.nn.Module) -> None:
    """Turn every BatchNorm of `net` into SyncBatchNorm, in place (the method keeps its reference to `net`):
    torch converts a module that is not itself a BatchNorm by replacing its children."""
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
