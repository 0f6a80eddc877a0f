"""What the torch-side stage scripts share: params, the repository root, the run's tags (command line: _cli.py).

This is the one place that reads the environment (DVC's experiment variables, git); `plca/` never does.
"""

from __future__ import annotations

import os

import _cli  # noqa: F401  (first: puts this repository's root first on sys.path, before plca is imported)

# Before torch loads OpenMP: busy-waiting worker threads make a 2-core machine that is running anything else
# 30x slower (measured: 2.8 s instead of 0.1 s a training step); passive waiting costs little when alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from plca.config import ConfigError  # noqa: E402
from plca.engine.distributed import DistConfig  # noqa: E402
from plca.engine.tracking import TrackingConfig  # noqa: E402
from plca.params import Params, load_params  # noqa: E402

# Queued `dvc exp run` stages run in a temporary copy below the repository: <root>/.dvc/tmp/exps/<tmp>/...
_EXPS_DIR = (".dvc", "tmp", "exps")


def repo_root(cwd: Path | None = None) -> Path:
    """The user's repository, also from inside a queued experiment's temporary workspace."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - len(_EXPS_DIR)):
        if parts[i : i + len(_EXPS_DIR)] == _EXPS_DIR:
            return Path(*parts[:i])
    return cwd


#: Pixels of each class in every source train label (stage class_stats): rare class sampling reads it.
CLASS_STATS = Path("stats") / "source_classes.json"
#: The source's spatial prior (stage spatial_prior): pseudo-label sets with `spatial_prior` (CBST-SP) apply it.
SPATIAL_PRIOR = Path("priors") / "spatial.npy"


def model_path(run: str, seed: int) -> Path:
    """Where a run's model of one seed lives (`models/<run>/s<seed>/model.pt`; run = pretrain or a variant)."""
    return Path("models") / run / f"s{seed}" / "model.pt"


def pseudo_path(name: str, seed: int) -> Path:
    """Where pseudo-label set `name` of one seed lives (the pseudo stage's output)."""
    return Path("pseudo") / name / f"s{seed}"


def wired(mapping: dict[str, Any], key: str, where: str) -> Any:
    """`mapping[key]` of params `runs.<where>` (a stage's own entry), or exit naming what is there."""
    if key not in mapping:
        sys.exit(f"error: params.runs.{where} has no entry '{key}'; entries: {sorted(mapping)}")
    return mapping[key]


def add_seed_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, action="append", help="a seed (repeatable); default: params.seeds")


def params_or_exit(path: str) -> Params:
    try:
        return load_params(path)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


def tracking_config(params: Params) -> TrackingConfig:
    """Tracking store and artefacts at the repository root, so queued experiments record there too."""
    cfg = params.tracking
    root = repo_root()
    uri = cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(root / uri[len(prefix):])
    artifact_root = str(root / cfg.artifact_root) if not Path(cfg.artifact_root).is_absolute() else cfg.artifact_root
    if "MLFLOW_TRACKING_URI" in os.environ:  # the user's own server wins
        uri = os.environ["MLFLOW_TRACKING_URI"]
    # one parent run per DVC experiment: its runs are nested below it
    return replace(cfg, uri=uri, artifact_root=artifact_root, group=experiment_name())


def experiment_name() -> str:
    """The DVC experiment a stage runs in (`dvc exp run` sets DVC_EXP_NAME), "workspace" for `dvc repro`."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tags(params: Params, stage: str, variant: str, seed: int) -> dict[str, str]:
    return {
        "git_rev": git_rev(),
        "dvc_exp": experiment_name(),
        "dvc_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "stage": stage,
        "variant": variant,
        "seed": str(seed),
        "profile": params.profile,
        "domain_pair": params.data.label,
    }


def distributed(params: Params, argv: list[str]) -> DistConfig:
    """This process among the training processes. Under torchrun (its RANK, WORLD_SIZE and LOCAL_RANK are set):
    opens the process group (NCCL on GPUs, gloo on the CPU). Not under torchrun, with `engine.processes` above 1:
    runs this same command again under torchrun on this machine (`--standalone`), which never returns."""
    if "LOCAL_RANK" not in os.environ:
        n = params.engine.processes
        if n > 1:
            # "--": torchrun's own parser would take the stage's --run for an abbreviation of its --run-path
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "--", *argv]
            print(f"engine.processes = {n}: {' '.join(cmd)}", flush=True)
            os.execvp(cmd[0], cmd)
        return DistConfig()
    dist = DistConfig(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                      local_rank=int(os.environ["LOCAL_RANK"]))
    if dist.active:
        import torch
        import torch.distributed

        gpu = params.engine.device != "cpu" and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl" if gpu else "gloo")
    return dist
