"""What the training loop does besides stepping, one hook per concern, each with its own state: the lr schedule,
the EMA teacher, the CSV log and MLflow, the progress bar, and checkpoint with exact resume.

Hooks run in list order at each point (`before_train`, `before_step`, `after_step`, `after_train`); `default_hooks`
puts the checkpoint last, so that it saves what the others recorded for the step. A hook's `state_dict` is saved in
the checkpoint and given back on resume.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm import tqdm

from plca.engine import checkpoint as ckpt
from plca.engine.optim import lr_factor
from plca.engine.tracking import Tracker
from plca.io import atomic_write_csv
from plca.models.ema import ema_update_

if TYPE_CHECKING:
    from plca.engine.trainer import Trainer

log = logging.getLogger(__name__)


class Hook:
    """Does nothing at every point; a subclass overrides what it needs."""

    #: The key of the hook's state in a checkpoint.
    name: ClassVar[str] = "hook"

    def before_train(self, trainer: Trainer) -> None:
        """After the networks and optimisers are built, before the first step (also of a resumed run)."""

    def before_step(self, trainer: Trainer) -> None:
        """Before step `trainer.step` (0-based) draws its batches."""

    def after_step(self, trainer: Trainer) -> None:
        """After the optimisers stepped: `trainer.step + 1` steps are done, `trainer.step_terms` holds the step's
        loss and terms (means over its micro-batches)."""

    def after_train(self, trainer: Trainer) -> None:
        """After the last step (also of a 0-step run)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class ScheduleHook(Hook):
    """Sets every optimiser's lr before each step: initial lr x the schedule of its `OptimConfig` (poly, or poly
    with warmup), and records the lrs of the step in `trainer.lrs`."""

    name = "schedule"

    def before_train(self, trainer: Trainer) -> None:
        for opt in trainer.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    def before_step(self, trainer: Trainer) -> None:
        for key, opt in trainer.optimizers.items():
            factor = lr_factor(trainer.optim_configs[key], trainer.step, trainer.total_steps)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
            trainer.lrs[key] = opt.param_groups[0]["lr"]


class EMAHook(Hook):
    """Updates each teacher the method declares from its student (`plca.models.ema_update_`), before the step's
    forward (DAFormer) or after the optimiser step (DACS), as its `EMASpec` says."""

    name = "ema"

    def _update(self, trainer: Trainer, before: bool) -> None:
        nets = trainer.networks
        for teacher, spec in trainer.method.teachers().items():
            if spec.before_step == before:
                ema_update_(nets[teacher], nets[spec.student], trainer.step, spec.alpha_max)

    def before_step(self, trainer: Trainer) -> None:
        self._update(trainer, before=True)

    def after_step(self, trainer: Trainer) -> None:
        self._update(trainer, before=False)


class LogHook(Hook):
    """Every `every` steps (and at the last), one row of means since the last row: step, the lrs (`lr` for the
    first optimiser, `lr/<name>` for the others), the loss and every term; written to the CSV (atomically, the whole
    log each time) and sent to MLflow."""

    name = "log"

    def __init__(self, every: int, csv_path: Path | None = None, tracker: Tracker | None = None) -> None:
        if every < 1:
            raise ValueError(f"log_every must be >= 1, got {every}")
        self.every, self.csv_path, self.tracker = every, csv_path, tracker
        self.rows: list[dict[str, float]] = []
        self._sums: dict[str, float] = defaultdict(float)
        self._counted = 0

    def after_step(self, trainer: Trainer) -> None:
        for k, v in trainer.step_terms.items():
            self._sums[k] += v
        self._counted += 1
        done = trainer.step + 1
        if done % self.every and done != trainer.total_steps:
            return
        lrs = {("lr" if i == 0 else f"lr/{k}"): lr for i, (k, lr) in enumerate(trainer.lrs.items())}
        row = {"step": float(done), **lrs, **{k: v / self._counted for k, v in self._sums.items()}}
        self.rows.append(row)
        self._sums.clear()
        self._counted = 0
        if self.csv_path is not None:
            atomic_write_csv(self.rows, self.csv_path)
        if self.tracker is not None:
            self.tracker.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=done)

    def after_train(self, trainer: Trainer) -> None:
        if self.csv_path is not None:  # also after 0 steps: a header-only log, so the stage's output exists
            atomic_write_csv(self.rows, self.csv_path)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "sums": dict(self._sums), "counted": self._counted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        self._sums = defaultdict(float, state["sums"])
        self._counted = int(state["counted"])


class ProgressHook(Hook):
    """A tqdm bar over the run's steps, starting where a resumed run starts; shows the step's loss."""

    name = "progress"

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled
        self._bar: Any = None

    def before_train(self, trainer: Trainer) -> None:
        self._bar = None

    def after_step(self, trainer: Trainer) -> None:
        if self._bar is None:
            self._bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=self.desc,
                             disable=not self.enabled, dynamic_ncols=True)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{trainer.step_terms['loss']:.3f}", refresh=False)

    def after_train(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()


class CheckpointHook(Hook):
    """Saves everything a run needs to continue (networks, optimisers, scaler, the method's and every hook's state,
    RNG states, the step) every `every` steps and after the last, atomically; on start, resumes from that file when
    it was written by the same configuration (`fingerprint`), else starts afresh with a warning. A finished run
    resumed runs no step: its caller gets the trained networks back (a stage of several seeds, killed after the
    first, does not train that one again)."""

    name = "checkpoint"

    def __init__(self, path: Path, fingerprint: str, every: int, code: str | None = None, save: bool = True) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path, self.fingerprint, self.every, self.code = Path(path), fingerprint, every, code
        #: False on every training process but the first: they resume from its checkpoints and write none
        self.saves = save

    def _load(self, trainer: Trainer) -> dict[str, Any] | None:
        """The last checkpoint, or the one before it when the last is damaged; None (with a warning) when
        neither can be trusted."""
        for path in (self.path, ckpt.previous(self.path)):
            if not path.is_file():
                continue
            try:
                return ckpt.load_verified(path, map_location=trainer.device)
            except ckpt.CheckpointError as exc:
                log.warning("%s; trying the checkpoint before it", exc)
        if self.path.is_file() or ckpt.previous(self.path).is_file():
            log.warning("no usable checkpoint in %s: starting afresh", self.path.parent)
        return None

    def before_train(self, trainer: Trainer) -> None:
        state = self._load(trainer)
        if state is None:
            return
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s belongs to another configuration: starting afresh", self.path)
            return
        if state.get("code") != self.code:  # resuming would mix two versions of the code in one run
            log.warning("%s was written by other code (the package's sources changed since): starting afresh",
                        self.path)
            return
        for k, net in trainer.networks.items():
            net.load_state_dict(state["networks"][k])
        for k, opt in trainer.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.method.load_state_dict(state["method"])
        for hook in trainer.hooks:
            if hook.name in state["hooks"]:
                hook.load_state_dict(state["hooks"][hook.name])
        # the states are CPU byte tensors, but the checkpoint was mapped onto the training device
        torch.set_rng_state(state["rng_cpu"].cpu())
        if trainer.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        trainer.start = trainer.step = int(state["step"])
        log.info("resumed from %s at step %d", self.path, trainer.start)

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.step + 1
        if self.saves and (done % self.every == 0 or done == trainer.total_steps):
            self.save(trainer, done)

    def save(self, trainer: Trainer, step: int) -> None:
        ckpt.save_verified(
            {
                "fingerprint": self.fingerprint,
                "code": self.code,
                "step": step,
                "networks": {k: n.state_dict() for k, n in trainer.networks.items()},
                "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
                "scaler": trainer.scaler.state_dict(),
                "method": trainer.method.state_dict(),
                "hooks": {h.name: h.state_dict() for h in trainer.hooks},
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if trainer.device.type == "cuda" else None,
            },
            self.path,
        )


def default_hooks(*, steps_name: str, log_every: int, checkpoint_every: int, checkpoint_path: Path,
                  fingerprint: str, log_csv: Path | None = None, tracker: Tracker | None = None,
                  progress: bool = True, code: str | None = None, main: bool = True) -> list[Hook]:
    """The hooks of a pipeline run, in the order they must run (the checkpoint last); `code`: the digest of the
    sources that run (`checkpoint.source_digest`), which a resumed checkpoint must share. `main`: False on every
    training process but the first, which then writes no log, checkpoint, MLflow record or progress bar (and
    still resumes from the first's checkpoint)."""
    return [
        ScheduleHook(),
        EMAHook(),
        LogHook(log_every, log_csv if main else None, tracker if main else None),
        ProgressHook(f"train {steps_name}", progress and main),
        CheckpointHook(checkpoint_path, fingerprint, checkpoint_every, code, save=main),
    ]
