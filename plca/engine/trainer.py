"""The one training loop: data streams, a method's step, poly lr, accumulation, AMP, checkpoint and resume.

It knows neither the dataset nor the method: it feeds each stream the method asks for, sums nothing itself, and
saves whatever the method's networks, optimisers and state hold. A run killed at any point resumes from its last
checkpoint and ends with the same weights as an uninterrupted run (batches are a function of the step; see
`streams.py`; optimiser, scheduler, scaler and RNG states are in the checkpoint).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from plca.engine import checkpoint as ckpt
from plca.engine.optim import OptimConfig, poly_factor
from plca.engine.streams import KeyedDataset, StepBatchSampler, stream_loader
from plca.engine.tracking import Tracker
from plca.methods.base import Method, TrainContext

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


@dataclass
class TrainConfig:
    """One run: its length, seed and optimiser, on the shared engine settings."""

    steps: int = 1000
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    seconds: float
    log: list[dict[str, float]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fingerprint(obj: Any) -> str:
    """A stable hash of a run's configuration: a checkpoint is resumed only by the run that wrote it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_csv_atomic(rows: list[dict[str, float]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns = columns or ["step", "lr"]  # no rows (a 0-step run): the columns every row starts with
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        every, log_every = cfg.engine.checkpoint_every, cfg.engine.log_every
        if every % log_every:
            # a checkpoint must fall on a logged step, or the partial log interval before it would be lost
            raise ValueError(f"checkpoint_every ({every}) must be a multiple of log_every ({log_every})")
        self.cfg = cfg
        self.device = resolve_device(cfg.engine.device)
        self.amp = cfg.engine.amp and self.device.type == "cuda"
        if cfg.engine.amp and not self.amp:
            log.info("amp requested but the device is %s: training in float32", self.device)

    def _batches(self, streams: dict[str, KeyedDataset], start: int) -> Iterator[dict[str, torch.Tensor]]:
        iters = {}
        for name, ds in streams.items():
            sampler = StepBatchSampler(len(ds), self.cfg.engine.batch_size, self.cfg.engine.grad_accum, self.cfg.seed,
                                       STREAM_IDS[name], start, self.cfg.steps)
            iters[name] = iter(stream_loader(ds, sampler, self.cfg.engine.num_workers))
        while True:
            batch: dict[str, torch.Tensor] = {}
            for name, it in iters.items():
                try:
                    item = next(it)
                except StopIteration:
                    return
                for key, value in item.items():
                    batch[f"{name}_{key}"] = value.to(self.device, non_blocking=True)
            yield batch

    def fit(
        self,
        method: Method,
        streams: dict[str, KeyedDataset],
        *,
        checkpoint_path: Path,
        run_fingerprint: str,
        log_csv: Path | None = None,
        tracker: Tracker | None = None,
        callbacks: tuple[Callable[[int], None], ...] = (),
        progress: bool = True,
    ) -> TrainResult:
        cfg = self.cfg
        missing = [s for s in method.streams if s not in streams]
        if missing:
            raise ValueError(f"method '{method.name}' needs stream(s) {missing}; given {sorted(streams)}")
        streams = {s: streams[s] for s in method.streams}
        nets = method.networks()
        for net in nets.values():
            net.to(self.device).train()
        optims = method.configure_optimizers(cfg.optim)
        # at least 1: a 0-step run (the paper profiles' ImageNet-initialised "pretraining") builds the schedule too
        horizon = cfg.optim.poly_horizon or max(cfg.steps, 1)
        scheds = {
            k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: poly_factor(s, horizon, cfg.optim.poly_power))
            for k, o in optims.items()
        }
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        rows: list[dict[str, float]] = []
        start = 0

        if checkpoint_path.is_file():
            state = ckpt.load(checkpoint_path, map_location=self.device)
            if state.get("fingerprint") != run_fingerprint:
                log.warning("%s belongs to another configuration: starting afresh", checkpoint_path)
            else:
                for k, net in nets.items():
                    net.load_state_dict(state["networks"][k])
                for k, o in optims.items():
                    o.load_state_dict(state["optimizers"][k])
                for k, s in scheds.items():
                    s.load_state_dict(state["schedulers"][k])
                scaler.load_state_dict(state["scaler"])
                method.load_state_dict(state["method"])
                torch.set_rng_state(state["rng_cpu"])
                if self.device.type == "cuda" and state.get("rng_cuda") is not None:
                    torch.cuda.set_rng_state(state["rng_cuda"])
                rows = list(state["log"])
                start = int(state["step"])
                log.info("resumed from %s at step %d", checkpoint_path, start)

        def save(step: int) -> None:
            ckpt.atomic_save(
                {
                    "fingerprint": run_fingerprint,
                    "step": step,
                    "networks": {k: n.state_dict() for k, n in nets.items()},
                    "optimizers": {k: o.state_dict() for k, o in optims.items()},
                    "schedulers": {k: s.state_dict() for k, s in scheds.items()},
                    "scaler": scaler.state_dict(),
                    "method": method.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                    "log": rows,
                },
                checkpoint_path,
            )

        t0 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        counted = 0
        batches = self._batches(streams, start)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {method.name}",
                   disable=not progress, dynamic_ncols=True)
        for step in bar:
            method.before_step(TrainContext(self.device, step, cfg.steps))
            for o in optims.values():
                o.zero_grad(set_to_none=True)
            for _ in range(cfg.engine.grad_accum):
                batch = next(batches)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    out = method.training_step(batch)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"step {step}: loss is {out.loss.item()} ({out.terms})")
                scaler.scale(out.loss / cfg.engine.grad_accum).backward()
                sums["loss"] += float(out.loss.detach()) / cfg.engine.grad_accum
                for k, v in out.terms.items():
                    sums[k] += v / cfg.engine.grad_accum
            for o in optims.values():
                scaler.step(o)
            scaler.update()
            lr = next(iter(optims.values())).param_groups[0]["lr"]
            for s in scheds.values():
                s.step()
            counted += 1
            done = step + 1
            if done % cfg.engine.log_every == 0 or done == cfg.steps:
                row = {"step": float(done), "lr": lr, **{k: v / counted for k, v in sums.items()}}
                rows.append(row)
                sums.clear()
                counted = 0
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if log_csv is not None:
                    write_csv_atomic(rows, log_csv)
                if tracker is not None:
                    tracker.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=done)
            if done % cfg.engine.checkpoint_every == 0 and done < cfg.steps:
                save(done)
            for cb in callbacks:
                cb(done)
        bar.close()
        if log_csv is not None:  # also after 0 steps: a header-only log, so the stage's output exists
            write_csv_atomic(rows, log_csv)
        return TrainResult(steps=cfg.steps, resumed_from=start, seconds=time.perf_counter() - t0, log=rows)
