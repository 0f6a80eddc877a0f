"""End to end: `dvc repro` of the whole pipeline at tiny sizes in a temporary copy of the repository, then
the caching a user relies on (one param changes, only what depends on it reruns) and an experiment.

The copy also gets a new method the way the README says to add one (one file in plca/methods/, one name in the
registry's import line, one variant in params.yaml), and it must reach results.csv, the tables and the figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from plca.data.labels import CLASS_NAMES
from plca.score import score

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_params(params: dict) -> dict:
    p = params
    p["data"]["embedded"].update(height=32, width=64, n_source_train=12, n_source_val=4, n_target_train=12,
                                 n_target_val=4, n_cities=2, workers=1)
    p["data"]["train_transform"].update(short_edge=[32, 36], crop=[32, 64])
    p["model"].update(width=0.125, groups=4, aspp_rates=[1, 2])
    p["engine"].update(batch_size=2, log_every=2, checkpoint_every=2)
    p["pretrain"]["steps"] = 4
    mit = p["networks"]["mit"]  # the smallest MiT whose stage-4 map (stride 32) the 32x64 crop still divides
    mit["model"].update(embed_dims=[8, 16, 40, 64], depths=[1, 1, 1, 1], head_embed_dims=16, head_channels=16)
    mit["pretrain"]["steps"] = 4
    p["methods"]["pgpc"]["contrast_size"] = [4, 8]
    for phase in ("adapt", "oracle"):
        p[phase]["steps"] = 6  # split in 2 (IntraDA's stages) and 3 (self-training rounds)
    p["seeds"] = [0]
    p["evaluate"]["samples"] = [0, 1]
    return p


#: A method that exists only in the test's copy: source supervision plus a small weight on the target's mean
#: squared logit (any target term will do; it must train, be evaluated and be reported like any other).
THROWAWAY_METHOD = '''"""A throwaway method, written by tests/test_pipeline.py into its copy of the repository."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from plca.engine.contract import Method, StepOutput
from plca.methods.base import source_supervision
from plca.methods.registry import register
from plca.models.output import LOGITS


@dataclass
class ThrowawayConfig:
    w_target: float = 0.01
    lovasz: bool = False
    w_lov: float = 0.75
    ignore_index: int = 255


@register(ThrowawayConfig)
class Throwaway(Method):
    name: ClassVar[str] = "throwaway"
    streams: ClassVar[tuple[str, ...]] = ("source", "target")
    cfg: ThrowawayConfig

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        out = source_supervision(self.model, self.model(batch["source_image"])[LOGITS], batch["source_label"],
                                 lovasz=cfg.lovasz, w_lov=cfg.w_lov, ignore_index=cfg.ignore_index)
        target = self.model(batch["target_image"])[LOGITS].float().pow(2).mean()
        out.loss = out.loss + cfg.w_target * target
        out.terms["target_sq"] = float(target.detach())
        return out
'''
THROWAWAY = "throwaway"
THROWAWAY_LABEL = "Throwaway (test method)"
THROWAWAY_RGB = (0, 255, 0)  # a colour no other variant has, to find it in the figures


def add_throwaway_method(ws: Path, params: dict) -> None:
    """One file in plca/methods/, one name in its import line, one variant (adapted, in both tables, in the
    figures' roles)."""
    (ws / "plca" / "methods" / f"{THROWAWAY}.py").write_text(THROWAWAY_METHOD)
    init = ws / "plca" / "methods" / "__init__.py"
    line = re.compile(r"^(from plca\.methods import [\w, ]+?)(\s+#.*)?$", re.MULTILINE)
    text, n = line.subn(lambda m: f"{m.group(1)}, {THROWAWAY}{m.group(2) or ''}", init.read_text(), count=1)
    assert n == 1, f"no registry import line in {init}"
    init.write_text(text)
    params["variants"][THROWAWAY] = {
        "train": {"method": THROWAWAY, "options": {"w_target": 0.01}},
        "show": {"label": THROWAWAY_LABEL, "tables": ["table1", "table2"], "colour": "#00ff00"},
    }
    params["runs"]["adapt"].append(THROWAWAY)
    params["runs"]["evaluate"].append(THROWAWAY)
    params["report"]["qualitative"].append(THROWAWAY)
    params["report"]["class_iou"].append(THROWAWAY)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    ws = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("reports/", "metrics/", "logs/")) and rel != "dvc.lock":
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ws / rel)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    # the stages must import the copy's plca (stages/_cli.py), not the editable install's: only the copy has it
    add_throwaway_method(ws, params)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # benchmarks.md is written by plca.bench, not by the pipeline; the reports index links it
    (ws / "reports").mkdir(exist_ok=True)
    (ws / "reports" / "benchmarks.md").write_text("# Benchmarks\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q"], ws, env)
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-qm", "tiny"], ws, env)
    run([str(BIN / "dvc"), "repro"], ws, env)
    return ws, env


def test_repro_writes_every_report(workspace: tuple[Path, dict[str, str]]) -> None:
    ws, _ = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    variants = params["runs"]["evaluate"]
    results = pd.read_csv(ws / "reports" / "results.csv")
    assert list(results.columns) == ["variant", "seed", "miou", *CLASS_NAMES]
    assert list(results["variant"]) == [v for v in params["variants"] if v in variants]  # params order
    assert results["miou"].between(0, 100).all()
    table1 = (ws / "reports" / "table1.md").read_text()
    assert "NOT GTA5/SYNTHIA" in table1 and "paper" in table1.lower()
    for f in ("table1.tex", "table2.md", "table2.tex", "cycles.md", "README.md", "summary.json",
              "figures/qualitative.png", "figures/training_curves.png", "figures/class_iou.png"):
        assert (ws / "reports" / f).is_file(), f
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    assert set(summary) == set(variants)
    # the index lists the hand-written pages that are there (benchmarks.md, from the fixture) and no others
    index = (ws / "reports" / "README.md").read_text()
    assert "(benchmarks.md)" in index and "embedded-pair-findings.md" not in index
    # every run kept its model, log and metrics; the source and target data are in the real formats
    ensembles = params["runs"]["ensembles"]
    assert ensembles, "the default runs an ensemble (AdvEnt+MinEnt)"
    for v in variants:
        assert (ws / "models" / v / "s0" / "model.pt").is_file()
        assert (ws / "logs" / v / "s0.csv").is_file() == (v not in ensembles)  # an ensemble is assembled
        m = json.loads((ws / "metrics" / v / "s0.json").read_text())
        assert m["variant"] == v and 0 <= m["miou"] <= 100
        # the cycle diagnostics ran on the 4 val pairs, for every DeepLab variant (not an ensemble, not a MiT)
        if v in ensembles or v in params["runs"]["networks"]:
            assert "cycles" not in m
        else:
            assert m["cycles"]["pairs"] == 4 and 0 <= m["cycles"]["features"]["positive_rate"] <= 100
    # IntraDA's chain: stage 1 trained half the steps, its ranking split the 12 target images 8 / 4 (int(12 x 0.67)),
    # the easy ones got label PNGs of their size, stage 2 trained the other half
    rank, labeller = "intrada_rank", params["runs"]["pseudo"]["intrada_rank"]
    pseudo = ws / "pseudo" / rank / "s0"
    easy = (pseudo / "labelled.txt").read_text().split()
    hard = (pseudo / "unlabelled.txt").read_text().split()
    assert (len(easy), len(hard)) == (8, 4) and not set(easy) & set(hard)
    assert sorted(p.stem for p in (pseudo / "labels").glob("*.png")) == sorted(easy)
    assert cv2.imread(str(pseudo / "labels" / f"{easy[0]}.png"), cv2.IMREAD_UNCHANGED).shape == (32, 64)
    summary_set = json.loads((pseudo / "summary.json").read_text())
    assert summary_set["labelled"] == 8 and 0 <= summary_set["precision"] <= 1
    round_name = "intrada"
    assert params["runs"]["rounds"][round_name]["pseudo"] == rank
    full = pd.read_csv(ws / "logs" / "plca" / "s0.csv")["step"].max()
    assert full == 6
    for v in (labeller, round_name):
        assert pd.read_csv(ws / "logs" / v / "s0.csv")["step"].max() == full // 2  # each half of adapt.steps
    # self-training: three rounds of a third each, each round's set labelled by the model before it; every
    # target image is in a class-balanced set, its unselected pixels 255; the report shows every set
    rounds = params["runs"]["rounds"]
    assert [rounds[v]["init"] for v in ("crst_r1", "crst_r2", "crst")] == ["pretrain", "crst_r1", "crst_r2"]
    for v in ("cbst_r1", "crst_r2", "plca_crst"):
        log = pd.read_csv(ws / "logs" / v / "s0.csv")
        assert log["step"].max() == full // 3 and "target_labelled" in log
    cb = json.loads((ws / "pseudo" / "crst_p3" / "s0" / "summary.json").read_text())
    assert (cb["labelled"], cb["unlabelled"], len(cb["thresholds"])) == (12, 0, 19)
    assert json.loads((ws / "metrics" / "pseudo" / "crst_p3" / "s0.json").read_text()) == cb
    assert len(list((ws / "metrics" / "pseudo" / "crst_p3" / "s0").glob("*.png"))) == 4
    pseudo_page = (ws / "reports" / "pseudo_labels.md").read_text()
    assert all(f"| {s} |" in pseudo_page or f"| `{s}` |" in pseudo_page for s in params["runs"]["pseudo"])
    # the mean-teacher family: the MiT pretrained once per seed, its variants from it with the EMA teacher; RCS's
    # class statistics counted once; each MiT row's gain paired against the MiT source-only row
    assert pd.read_csv(ws / "logs" / "pretrain_mit" / "s0.csv")["step"].max() == 4
    stats = json.loads((ws / "stats" / "source_classes.json").read_text())
    assert stats["images"] == len(stats["counts"]) == 12
    for v, terms in (("dacs", {"ce_mix", "pseudo_weight"}), ("daformer", {"fd"}), ("pgpc", {"cl_src", "cl_mix"})):
        assert terms <= set(pd.read_csv(ws / "logs" / v / "s0.csv").columns), v
    table2 = (ws / "reports" / "table2.md").read_text()
    assert "(vs MiT source-only)" in table2
    # each evaluation wrote its whole target-val prediction set in label ids: the scorer gives the stage's mIoU
    for v in ("plca", "daformer"):
        scored, _ = score(ws / "eval" / v / "s0" / "labelIds", ws / "data/embedded/target/gtFine/val")
        m = json.loads((ws / "metrics" / v / "s0.json").read_text())
        assert scored["images"] == 4 and scored["mIoU"] == pytest.approx(m["miou"], abs=1e-9), v
    assert "4 val pairs" in (ws / "reports" / "cycles.md").read_text()
    assert next((ws / "data/embedded/target/gtFine/val").rglob("*_gtFine_labelIds.png"))
    assert next((ws / "data/embedded/source/labels").glob("*.png"))
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert {"prepare", "pretrain", "pretrain_network@mit", "class_stats", "train_network@daformer", "adapt@plca",
            "evaluate@oracle", "report", f"pseudo@{rank}", f"round@{round_name}",
            "ensemble@advent_minent"} <= set(lock["stages"])


def _png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _near(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 25) -> int:
    return int((np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


def test_a_new_method_reaches_the_results_the_tables_and_the_figures(workspace: tuple[Path, dict[str, str]]) -> None:
    ws, _ = workspace
    reports = ws / "reports"
    results = pd.read_csv(reports / "results.csv")
    assert list(results["variant"])[-1] == THROWAWAY and results["miou"].between(0, 100).all()
    assert json.loads((ws / "metrics" / THROWAWAY / "s0.json").read_text())["variant"] == THROWAWAY
    assert "target_sq" in pd.read_csv(ws / "logs" / THROWAWAY / "s0.csv").columns  # its own loss term, logged
    table1 = (reports / "table1.md").read_text().splitlines()
    assert any(line.startswith(f"| {THROWAWAY_LABEL} | – | 1 | ") for line in table1)  # ours alone: no paper column
    assert (reports / "table2.md").read_text().count(f"| ours: {THROWAWAY_LABEL} (n=1) |") == 2  # both blocks
    assert THROWAWAY in json.loads((reports / "summary.json").read_text())
    # drawn in its colour: a line (and legend entry) in the training curves, bars or a legend patch in class_iou
    for figure in ("training_curves.png", "class_iou.png"):
        assert _near(_png(reports / "figures" / figure), THROWAWAY_RGB) > 50, figure
    index = (reports / "README.md").read_text()
    assert f"| {THROWAWAY_LABEL}" in index and f"vs {THROWAWAY_LABEL}, mean" in index  # qualitative and bars


def mlflow_runs(ws: Path) -> dict[tuple[str, str], Any]:
    """(parent run's name, run name) -> run, for every run of the workspace's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlruns.db")
    exp = client.get_experiment_by_name(yaml.safe_load((ws / "params.yaml").read_text())["tracking"]["experiment"])
    found = client.search_runs([exp.experiment_id], max_results=5000)
    names = {r.info.run_id: r.info.run_name for r in found}
    return {(names.get(r.data.tags.get("mlflow.parentRunId"), ""), r.info.run_name): r for r in found}


def test_mlflow_runs_nest_under_the_experiment_with_their_evaluation(workspace: tuple[Path, dict[str, str]]) -> None:
    from mlflow.tracking import MlflowClient

    from plca.experiment import file_digest

    ws, _ = workspace
    runs = mlflow_runs(ws)
    assert ("", "workspace") in runs  # the parent of every run of `dvc repro`
    assert not any(name.startswith("eval-") for _, name in runs)  # an evaluation is in its model's run
    pretrain, plca = runs["workspace", "pretrain-s0"], runs["workspace", "plca-s0"]
    assert pretrain.info.status == "FINISHED" and plca.info.status == "FINISHED"
    tags = plca.data.tags
    assert tags["stage"] == "adapt" and tags["variant"] == "plca" and tags["seed"] == "0"
    assert tags["dvc_exp"] == "workspace" and len(tags["git_rev"]) == 40
    assert tags["model_digest"] == file_digest(ws / "models" / "plca" / "s0" / "model.pt")
    # training curves and the evaluation side by side in one run; its mIoU is the stage's
    metrics = plca.data.metrics
    assert {"train/loss", "train/fass", "train/lr", "target/mIoU19", "target/IoU/road"} <= set(metrics)
    miou = json.loads((ws / "metrics" / "plca" / "s0.json").read_text())["miou19"]
    assert metrics["target/mIoU19"] == pytest.approx(miou)
    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlruns.db")
    stored = {f.path for f in client.list_artifacts(plca.info.run_id, "model")}
    assert stored == {"model/model.pt", "model/config.json"}
    evaluation = {f.path for f in client.list_artifacts(plca.info.run_id, "evaluation")}
    assert {"evaluation/confusion.png", "evaluation/metrics.json", "evaluation/labelIds"} <= evaluation
    predictions = client.list_artifacts(plca.info.run_id, "evaluation/labelIds")
    assert len(predictions) == len(list((ws / "eval" / "plca" / "s0" / "labelIds").glob("*.png"))) > 0


def test_one_param_reruns_only_what_depends_on_it(workspace: tuple[Path, dict[str, str]]) -> None:
    ws, env = workspace
    assert "up to date" in run([str(BIN / "dvc"), "status"], ws, env).lower()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["variants"]["fass"]["train"]["options"]["w_ass"] = 0.2
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro"], ws, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # the report reruns only if the new metrics differ, which four tiny steps need not produce
    assert {"adapt@fass", "evaluate@fass"} <= ran <= {"adapt@fass", "evaluate@fass", "report"}


def test_a_lambda_of_advent_reruns_advent_and_the_ensemble_built_on_it(workspace: tuple[Path, dict[str, str]]
                                                                     ) -> None:
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["variants"]["advent"]["train"].setdefault("options", {})["w_adv_main"] = 0.002
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro"], ws, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    built_on = {"adapt@advent", "evaluate@advent", "ensemble@advent_minent", "evaluate@advent_minent"}
    assert built_on <= ran <= built_on | {"report"}


def _status_after(ws: Path, env: dict[str, str], edit: Callable[[dict], None]) -> dict:
    """`dvc status --json` with params.yaml edited, then restored."""
    path = ws / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        res = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=ws, env=env, capture_output=True, text=True,
                             timeout=300)
    finally:
        path.write_text(original)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_test_time_alpha_invalidates_every_aggregated_evaluation(workspace: tuple[Path, dict[str, str]]) -> None:
    # plca_no_sagg trains without aggregation, so a new methods.plca.alpha leaves its model byte-identical; its
    # evaluation still aggregates at test time with that alpha and must rerun
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    status = _status_after(ws, env, lambda p: p["methods"]["plca"].update(alpha=0.25))
    aggregated = [v for v in params["runs"]["evaluate"] if params["variants"][v]["train"].get("test_time_aggregation")]
    assert "plca_no_sagg" in aggregated
    for variant in aggregated:
        assert "methods" in str(status.get(f"evaluate@{variant}")), (variant, status)
    assert "adapt@plca_no_sagg" in status and "pretrain" not in status and "prepare" not in status


def test_relabelling_a_variant_reruns_only_the_report(workspace: tuple[Path, dict[str, str]]) -> None:
    ws, env = workspace

    def relabel(params: dict) -> None:
        show = params["variants"]["fass"]["show"]
        show.update(label="feature association", colour="#123456", tables=["table2"])
        params["report"]["class_iou"].append("fass")

    assert set(_status_after(ws, env, relabel)) == {"report"}


def test_bad_param_stops_with_its_name(workspace: tuple[Path, dict[str, str]]) -> None:
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["methods"]["plca"]["alpah"] = 0.3
    bad = ws / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, "stages/train.py", "--params", str(bad), "--run", "plca", "--seed", "0"],
                         cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "alpah" in res.stderr and "bad.yaml" in res.stderr


def test_experiment_in_a_temporary_workspace_records_into_the_repository(
    workspace: tuple[Path, dict[str, str]],
) -> None:
    ws, env = workspace
    # the one evaluation and what it needs: a temporary copy restores no uncached output (logs, metrics), so a whole
    # `dvc exp run --temp` would retrain every stage
    run([str(BIN / "dvc"), "exp", "run", "--temp", "-n", "tiny-lsr", "-S", "variants.fass.train.options.lsr=true",
         "evaluate@fass"], ws, env)
    res = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=ws, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    shown = json.loads(res.stdout)
    names = json.dumps(shown)
    assert "tiny-lsr" in names
    # the queued-style run (in .dvc/tmp/exps/...) recorded into the repository's own store, under a parent run
    # named after the experiment: the fass run with its training and its evaluation
    fass = mlflow_runs(ws)["tiny-lsr", "fass-s0"]
    assert fass.data.tags["dvc_exp"] == "tiny-lsr" and fass.info.status == "FINISHED"
    assert {"train/loss", "target/mIoU19"} <= set(fass.data.metrics)
    # the workspace itself is untouched
    assert yaml.safe_load((ws / "params.yaml").read_text())["variants"]["fass"]["train"]["options"]["lsr"] is False


def test_a_queued_experiment_runs_its_own_code(workspace: tuple[Path, dict[str, str]]) -> None:
    """Queue an experiment, then break the method's file in the workspace: the queued run still trains with the
    code it was queued with (each stage puts its own checkout first on sys.path; the editable install points at
    another checkout, which has no throwaway method at all)."""
    ws, env = workspace
    method = ws / "plca" / "methods" / f"{THROWAWAY}.py"
    good = method.read_text()
    run([str(BIN / "dvc"), "exp", "run", "--queue", "-n", "own-code", "-S",
         f"variants.{THROWAWAY}.train.options.w_target=0.02", f"adapt@{THROWAWAY}"], ws, env)
    broken = good.replace("        out.loss = out.loss", "        raise RuntimeError('the workspace code ran')\n"
                          "        out.loss = out.loss", 1)
    assert broken != good
    method.write_text(broken)
    try:
        run([str(BIN / "dvc"), "exp", "run", "--run-all"], ws, env)
    finally:
        method.write_text(good)
    trained = mlflow_runs(ws)["own-code", f"{THROWAWAY}-s0"]
    assert trained.info.status == "FINISHED"
    assert trained.data.params["options.w_target"] == "0.02" and "train/target_sq" in trained.data.metrics
