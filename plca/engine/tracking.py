"""MLflow tracking, grouped the way the UI shows it, that can fail without costing a result.

One parent run per DVC experiment (`TrackingConfig.group`: the experiment's name, "workspace" for `dvc repro`),
and under it one run per variant x seed holding its training curves, its evaluation and its artefacts, so that
comparing two variants is selecting two runs. A stage finds its run by tags (the experiment, the run's name and
what it must match: a training's fingerprint, the digest of the model an evaluation scores) and continues it, or
creates it. The store is opened, and the parent found or created, under a file lock: several stages starting at
once on a fresh sqlite store would otherwise race in its schema migration and break it for good.

Every MLflow error (store locked, disk full, MLflow missing) becomes one warning and disables the tracker.
"""

from __future__ import annotations

import fcntl
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: MLflow refuses parameter values longer than this (its own limit is 6000 characters).
_MAX_PARAM_LEN = 500
#: Tags that say what a run is: the parent of a DVC experiment or a variant x seed run below it.
ROLE, GROUP, RUN = "plca_role", "dvc_exp", "plca_run"
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests a run under another


@dataclass
class TrackingConfig:
    """Where runs are recorded. Relative paths are resolved against the repository root by the caller.
    `group`: the parent run the runs go under (the stages set it to the DVC experiment's name); `log_models`:
    also store each trained model file in its run; `log_predictions`: also store each evaluation's label-id
    predictions."""

    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "pipeline"
    artifact_root: str = "mlruns"
    group: str = "workspace"
    log_models: bool = True
    log_predictions: bool = True


@contextmanager
def store_lock(cfg: TrackingConfig) -> Iterator[None]:
    """An exclusive lock beside the artefacts, held while a process opens the store and finds its runs."""
    root = Path(cfg.artifact_root)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".plca-tracking.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _filter(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


class Tracker:
    """The MLflow run of one variant x seed (`run_name`) in the experiment's group. Use as a context manager; an
    exception inside marks the run FAILED.

    On entry it marks the runs of the same name still RUNNING (their process was killed) as KILLED, then continues
    the newest run of that name whose tags include `match` and whose params agree with `params`, else creates one
    under the group's parent run. `tags` are set where the run has no value for them yet, so an evaluation does
    not overwrite its training's `stage`; `match` is always set.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        *,
        match: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_name = run_name
        self.params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in (params or {}).items()}
        self.tags = dict(tags or {})
        self.match = dict(match or {})
        self.active = False
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.continued = False
        self._client: Any = None

    def _fail(self, what: str, exc: BaseException) -> None:
        warnings.warn(f"MLflow tracking disabled after an error while {what}: {exc}", RuntimeWarning, stacklevel=3)
        self.active = False

    def __enter__(self) -> Tracker:
        if not self.cfg.enabled:
            return self
        try:
            with store_lock(self.cfg):
                self._open()
            self.active = True
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("starting the run", exc)
        return self

    def _open(self) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        client = self._client = MlflowClient(tracking_uri=self.cfg.uri)
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            exp_id = client.create_experiment(self.cfg.experiment,
                                              artifact_location=Path(self.cfg.artifact_root).resolve().as_uri())
        else:
            exp_id = exp.experiment_id
        group = self.cfg.group
        parents = client.search_runs([exp_id], _filter({ROLE: "experiment", GROUP: group}), max_results=1,
                                     order_by=["attributes.start_time ASC"])
        if parents:
            self.parent_id = parents[0].info.run_id
        else:
            parent = client.create_run(exp_id, run_name=group, tags={ROLE: "experiment", GROUP: group})
            self.parent_id = parent.info.run_id
            client.set_terminated(self.parent_id, "FINISHED")  # a group, not a process: never left RUNNING
        mine = client.search_runs([exp_id], _filter({ROLE: "run", GROUP: group, RUN: self.run_name}),
                                  order_by=["attributes.start_time DESC"], max_results=1000)
        for run in mine:
            if run.info.status == "RUNNING":  # its process died: the stage is starting again
                client.set_terminated(run.info.run_id, "KILLED")
                client.set_tag(run.info.run_id, "killed_seen_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        chosen = next((r for r in mine if all(r.data.tags.get(k) == v for k, v in self.match.items())
                       and all(r.data.params.get(k, v) == v for k, v in self.params.items())), None)
        if chosen is None:
            run = client.create_run(exp_id, run_name=self.run_name,
                                    tags={**self.tags, **self.match, ROLE: "run", GROUP: group, RUN: self.run_name,
                                          PARENT_TAG: self.parent_id})
            self.run_id, have_params, have_tags = run.info.run_id, {}, set()
        else:
            self.run_id, self.continued = chosen.info.run_id, True
            have_params, have_tags = chosen.data.params, set(chosen.data.tags)
            client.update_run(self.run_id, status="RUNNING")
        new_params = [Param(k, v) for k, v in self.params.items() if k not in have_params]
        new_tags = [RunTag(k, v) for k, v in {**self.tags, **self.match}.items()
                    if k not in have_tags or k in self.match]
        for i in range(0, max(len(new_params), len(new_tags)), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self.run_id, params=new_params[i:i + 100], tags=new_tags[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                  if v is not None and math.isfinite(float(v))]
        try:
            for i in range(0, len(finite), 1000):
                self._client.log_batch(self.run_id, metrics=finite[i:i + 1000])
        except Exception as exc:  # noqa: BLE001
            self._fail("logging metrics", exc)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Store a file (or, for a folder, everything in it) under `artifact_path` of the run."""
        if not self.active:
            return
        try:
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"logging artefact {path}", exc)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as exc:  # noqa: BLE001
            self._fail("setting tags", exc)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        try:
            self._client.set_terminated(self.run_id, "FAILED" if exc_type is not None else "FINISHED")
        except Exception as err:  # noqa: BLE001
            self._fail("ending the run", err)
        self.active = False
