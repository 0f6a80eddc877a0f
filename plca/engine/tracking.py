"""MLflow tracking that can fail without costing a result: every call warns once and then goes quiet."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: MLflow refuses parameter values longer than this (its own limit is 6000 characters).
_MAX_PARAM_LEN = 500


@dataclass
class TrackingConfig:
    """Where runs are recorded. Relative paths are resolved against the repository root by the caller."""

    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "pipeline"
    artifact_root: str = "mlruns"


class Tracker:
    """One MLflow run. Use as a context manager; an exception inside marks the run FAILED.

    Any MLflow error (store locked, disk full, MLflow missing) becomes a warning and disables the tracker, so a
    finished training result is never lost because tracking broke.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_name = run_name
        self.params = params or {}
        self.tags = tags or {}
        self.active = False
        self.run_id: str | None = None
        self._mlflow: Any = None

    def _fail(self, what: str, exc: BaseException) -> None:
        warnings.warn(f"MLflow tracking disabled after an error while {what}: {exc}", RuntimeWarning, stacklevel=3)
        self.active = False

    def __enter__(self) -> Tracker:
        if not self.cfg.enabled:
            return self
        try:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(self.cfg.uri)
            exp = mlflow.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                artifact_uri = Path(self.cfg.artifact_root).resolve().as_uri()
                exp_id = mlflow.create_experiment(self.cfg.experiment, artifact_location=artifact_uri)
            else:
                exp_id = exp.experiment_id
            run = mlflow.start_run(experiment_id=exp_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
            self.active = True
            if self.params:
                clipped = {k: str(v)[:_MAX_PARAM_LEN] for k, v in self.params.items()}
                mlflow.log_params(clipped)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("starting the run", exc)
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        try:
            self._mlflow.log_metrics(finite, step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("logging metrics", exc)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"logging artefact {path}", exc)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        try:
            self._mlflow.set_tags(tags)
        except Exception as exc:  # noqa: BLE001
            self._fail("setting tags", exc)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        try:
            self._mlflow.end_run(status="FAILED" if exc_type is not None else "FINISHED")
        except Exception as err:  # noqa: BLE001
            self._fail("ending the run", err)
        self.active = False
