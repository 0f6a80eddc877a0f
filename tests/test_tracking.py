"""MLflow runs as users find them: one parent per DVC experiment, a run per variant x seed holding training and
evaluation, killed runs marked, resumed ones continued, and a fresh store safe to open from several processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plca.engine.tracking import PARENT_TAG, Tracker, TrackingConfig

mlflow = pytest.importorskip("mlflow", reason="tracking tests need mlflow (a requirement)")


def cfg(tmp: Path, group: str = "workspace") -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp}/mlruns.db", experiment="t", artifact_root=str(tmp / "art"),
                          group=group)


def runs(tmp: Path) -> list:
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlruns.db")
    exp = client.get_experiment_by_name("t")
    return client.search_runs([exp.experiment_id], max_results=1000)


def by_id(tmp: Path, run_id: str):  # noqa: ANN201
    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlruns.db").get_run(run_id)


def test_runs_nest_under_one_parent_per_experiment(tmp_path: Path) -> None:
    ids = {}
    for group, name in (("workspace", "plca-s0"), ("workspace", "fass-s0"), ("alpha-03", "plca-s0")):
        with Tracker(cfg(tmp_path, group), name, {"alpha": 0.5}, {"variant": name[:-3]}) as tr:
            assert tr.active
            ids[group, name] = (tr.run_id, tr.parent_id)
    parents = [r for r in runs(tmp_path) if r.data.tags.get("plca_role") == "experiment"]
    assert sorted(r.info.run_name for r in parents) == ["alpha-03", "workspace"]
    assert all(r.info.status == "FINISHED" for r in parents)
    workspace = next(r.info.run_id for r in parents if r.info.run_name == "workspace")
    assert ids["workspace", "plca-s0"][1] == ids["workspace", "fass-s0"][1] == workspace
    assert ids["alpha-03", "plca-s0"][1] != workspace
    for run_id, parent in ids.values():
        run = by_id(tmp_path, run_id)
        assert run.data.tags[PARENT_TAG] == parent  # what the UI nests by
        assert run.data.tags["dvc_exp"] in ("workspace", "alpha-03")


def test_evaluation_goes_into_the_run_that_trained_the_model(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    with Tracker(c, "plca-s0", {"alpha": 0.5}, {"stage": "adapt"}, match={"fingerprint": "f1", "code": "c1"}) as tr:
        tr.log_metrics({"train/loss": 1.0}, step=10)
        tr.set_tags({"model_digest": "m1"})
        trained = tr.run_id
    with Tracker(c, "plca-s0", {"eval.alpha": 0.5}, {"stage": "evaluate"}, match={"model_digest": "m1"}) as tr:
        tr.log_metrics({"target/mIoU19": 40.0})
        assert tr.continued and tr.run_id == trained
    run = by_id(tmp_path, trained)
    assert run.data.metrics == {"train/loss": 1.0, "target/mIoU19": 40.0}
    assert run.data.params == {"alpha": "0.5", "eval.alpha": "0.5"}
    assert run.data.tags["stage"] == "adapt"  # the training's tag is kept
    assert run.info.status == "FINISHED"
    # a model this experiment did not train (a DVC experiment that only re-evaluates): a run of its own
    with Tracker(c, "plca-s0", {"eval.alpha": 0.5}, {"stage": "evaluate"}, match={"model_digest": "m2"}) as tr:
        assert not tr.continued and tr.run_id != trained
        other = tr.run_id
    assert by_id(tmp_path, other).data.tags["model_digest"] == "m2"
    # the same model scored with other settings: params cannot change, so not in the same run
    with Tracker(c, "plca-s0", {"eval.alpha": 0.9}, match={"model_digest": "m1"}) as tr:
        assert tr.run_id not in (trained, other)


KILLED_CHILD = """
import os, signal, sys
from plca.engine.tracking import Tracker, TrackingConfig
c = TrackingConfig(uri=sys.argv[1], experiment="t", artifact_root=sys.argv[2])
with Tracker(c, "plca-s0", {"alpha": 0.5}, match={"fingerprint": sys.argv[3]}) as tr:
    tr.log_metrics({"train/loss": 2.0}, step=5)
    print(tr.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_run(tmp: Path, fp: str) -> str:
    c = cfg(tmp)
    res = subprocess.run([sys.executable, "-c", KILLED_CHILD, c.uri, c.artifact_root, fp], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    return res.stdout.strip()


def test_a_resumed_training_continues_its_run_and_a_killed_one_is_marked(tmp_path: Path) -> None:
    first = killed_run(tmp_path, "f1")
    assert by_id(tmp_path, first).info.status == "RUNNING"  # what a SIGKILL leaves
    with Tracker(cfg(tmp_path), "plca-s0", {"alpha": 0.5}, match={"fingerprint": "f1"}) as tr:
        assert tr.run_id == first  # the checkpoint resumes: so does the run
        tr.log_metrics({"train/loss": 1.0}, step=10)
    run = by_id(tmp_path, first)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 1.0
    # killed again, and restarted with other params: the old run is marked killed, a new one starts
    second = killed_run(tmp_path, "f2")
    assert second != first
    with Tracker(cfg(tmp_path), "plca-s0", {"alpha": 0.7}, match={"fingerprint": "f3"}) as tr:
        assert tr.run_id not in (first, second)
    assert by_id(tmp_path, second).info.status == "KILLED"
    assert by_id(tmp_path, first).info.status == "FINISHED"


PARALLEL_CHILD = """
import sys, warnings
warnings.filterwarnings("error", "MLflow tracking disabled")  # only a warning in the stages
from plca.engine.tracking import Tracker, TrackingConfig
c = TrackingConfig(uri=sys.argv[1], experiment="t", artifact_root=sys.argv[2])
with Tracker(c, sys.argv[3], {"i": sys.argv[3]}) as tr:
    tr.log_metrics({"train/loss": 1.0}, step=1)
    assert tr.active
"""


def test_parallel_first_use_of_a_fresh_store(tmp_path: Path) -> None:
    """Three trainings starting together on a store that does not exist yet all record, under one parent."""
    c = cfg(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARALLEL_CHILD), c.uri, c.artifact_root,
                               f"run{i}-s0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    found = runs(tmp_path)
    assert sorted(r.info.run_name for r in found) == ["run0-s0", "run1-s0", "run2-s0", "workspace"]
    assert all(r.data.metrics.get("train/loss") == 1.0 for r in found if r.info.run_name != "workspace")


def test_tracking_off_records_nothing(tmp_path: Path) -> None:
    off = TrackingConfig(enabled=False, uri=f"sqlite:///{tmp_path}/mlruns.db", artifact_root=str(tmp_path / "a"))
    with Tracker(off, "plca-s0") as tr:
        tr.log_metrics({"x": 1.0})
        assert not tr.active
    assert not (tmp_path / "mlruns.db").exists()
