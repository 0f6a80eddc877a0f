"""Fault injection: the reliability guarantees of reports/reliability.md, kept in one module that runs in CI.

1. Trainings killed with SIGKILL (at seeded random points of the loop; halfway through writing a checkpoint, its
   checksum, the log or the model; between moving a checkpoint and its checksum aside) resume, or start over, to the
   weights and log of an uninterrupted run, bit for bit; a checkpoint on disk is whole or refused, never half of one
   that loads; the temporary file of a killed write is gone after the next start; a checkpoint of other params or
   other code is not resumed.
2. Pseudo-label and evaluation writes killed halfway through a file: the set or file is absent, the previous one, or
   whole; never half-written under its name; the next run writes it whole.
3. Bad inputs, one table each: params files (`plca.params.load_params`) and images and labels (the readers of
   `plca.data.datasets` and `plca.data.verify.verify_dataset`, also in a folder whose name is not UTF-8), each
   refused with its named error, whose message names the file and the key.

The killed runs are `plca.experiment.train_run` / `pseudo_label_run` / `evaluate_run` on params.yaml with tiny sizes,
in a child script of this module: the faults are injected there (a hook that SIGKILLs its own process; a wrapped
`plca.io.atomic_write` or `rename` that SIGKILLs it halfway through a file or before a move), never inside plca. The
uninterrupted reference and the resumes after a random kill run in processes of their own too; the other "next
starts" run in this process (the same functions; a process of their own would only cost its start).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import yaml
from real_formats import (
    cityscapes_paths,
    truncate_file,
    write_cityscapes,
    write_grey_png,
    write_gta5,
    write_palette_png,
    write_rgb_png,
    write_synthia,
)

from plca.config import ConfigError
from plca.data.datasets import CityscapesReader, DataError, GTA5Reader, SynthiaReader
from plca.data.labels import LabelError
from plca.data.verify import DatasetError, VerifyConfig, verify_dataset
from plca.engine import checkpoint as ckpt
from plca.experiment import PREDICTIONS, PRETRAIN, RunSpec, evaluate_run, pseudo_label_run, train_run
from plca.io import read_image, show_path
from plca.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())

#: The tiny training every fault interrupts: source-only pretraining, checkpointed every 2 of its 6 steps.
STEPS, EVERY = 6, 2
#: Where in a step the child kills itself: before the step draws its batches, after it but before the checkpoint
#: hook saves, or after the checkpoint hook (the last hook).
WHERE = ("before_step", "before_checkpoint", "after_checkpoint")
#: The seeds of the random kill points (a step and a place in it, drawn by `kill_point`).
KILL_SEEDS = (0, 7, 20)
SIGKILLED = -signal.SIGKILL
TARGET_TRAIN, TARGET_VAL = 6, 3


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from more


# ---------------------------------------------------------------------------------------------- the child process

CHILD = textwrap.dedent('''
    """One run of plca.experiment, killed with SIGKILL where the spec (argv[1], JSON) says."""
    import fnmatch
    import io
    import json
    import os
    import signal
    import sys
    from pathlib import Path

    spec = json.loads(Path(sys.argv[1]).read_text())
    import plca.experiment as ex
    if spec["task"] == "evaluate":
        import plca.evaluation.run_figures  # noqa: F401  (imported now, so that its atomic_write is wrapped too)
    import plca.io as pio
    from plca.engine.hooks import Hook
    from plca.params import load_params

    kill = spec.get("kill") or {}


    def die():
        os.kill(os.getpid(), signal.SIGKILL)


    if kill.get("at") == "step":
        class Kill(Hook):
            name = "fault_kill"

            def before_step(self, t):
                if kill["where"] == "before_step" and t.step == kill["step"]:
                    die()

            def after_step(self, t):
                if kill["where"] != "before_step" and t.step == kill["step"]:
                    die()

        real_hooks = ex.default_hooks

        def default_hooks(**kw):
            hooks = real_hooks(**kw)
            at = len(hooks) if kill["where"] == "after_checkpoint" else len(hooks) - 1  # the checkpoint is last
            return hooks[:at] + [Kill()] + hooks[at:]

        ex.default_hooks = default_hooks

    if kill.get("at") == "write":
        real = pio.atomic_write
        seen = [0]

        def atomic_write(path, write):
            if fnmatch.fnmatchcase(Path(path).name, kill["name"]):
                seen[0] += 1
                if seen[0] == kill["nth"]:
                    buf = io.BytesIO()
                    write(buf)
                    data = buf.getvalue()

                    def part(fh):  # a part of the file on disk, then the kill
                        fh.write(data[: int(len(data) * kill["fraction"])])
                        fh.flush()
                        os.fsync(fh.fileno())
                        print(json.dumps({"killed_writing": str(path), "bytes": len(data)}), flush=True)
                        die()

                    return real(path, part)
            return real(path, write)

        for module in list(sys.modules.values()):  # every module that imported the writer by name
            if getattr(module, "atomic_write", None) is real:
                module.atomic_write = atomic_write

    if kill.get("at") == "rename":
        real_rename = pio.rename
        renames = [0]

        def rename(src, dst):
            renames[0] += 1
            if renames[0] == kill["nth"]:
                print(json.dumps({"killed_renaming": str(src)}), flush=True)
                die()
            real_rename(src, dst)

        for module in list(sys.modules.values()):
            if getattr(module, "rename", None) is real_rename:
                module.rename = rename

    params = load_params(spec["params"])
    root = Path(spec["root"])
    common = dict(tracking=params.tracking, tags={}, progress=False)
    if spec["task"] == "train":
        result = ex.train_run(params, ex.RunSpec(ex.PRETRAIN, 0), out_dir=root / "models" / "pretrain" / "s0",
                              log_csv=root / "logs" / "pretrain" / "s0.csv",
                              checkpoint_dir=root / "checkpoints" / "pretrain-s0", init_model=None, **common)
    elif spec["task"] == "pseudo":
        result = ex.pseudo_label_run(params, "intrada_rank", 0, model_path=Path(spec["model"]),
                                     out_dir=root / "pseudo" / "intrada_rank" / "s0", **common)
    else:
        result = ex.evaluate_run(params, ex.RunSpec("source_only", 0), model_path=Path(spec["model"]),
                                 out_dir=root / "eval" / "source_only" / "s0",
                                 metrics_path=root / "metrics" / "source_only" / "s0.json", **common)
    print(json.dumps({"result": result}), flush=True)
''')


@dataclass
class World:
    """Tiny data in the real layouts, tiny params for them, the child script, and the uninterrupted run."""

    tmp: Path
    params_path: Path
    params: Params
    child: Path
    reference: Path  # the root of the uninterrupted training

    def run(self, task: str, root: Path, kill: dict[str, Any] | None = None,
            model: Path | None = None) -> subprocess.CompletedProcess[str]:
        spec = root / f"spec-{task}-{len(list(root.glob('spec-*')))}.json"
        root.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps({"task": task, "params": str(self.params_path), "root": str(root), "kill": kill,
                                    "model": None if model is None else str(model)}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, str(self.child), str(spec)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)

    def finish(self, task: str, root: Path, model: Path | None = None) -> dict[str, Any]:
        """Run to completion (no fault) in a process of its own; the run's result."""
        proc = self.run(task, root, model=model)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["result"]

    def here(self, task: str, root: Path, model: Path | None = None) -> dict[str, Any]:
        """Run to completion in this process, as the child does (the next start after a kill, where a process of
        its own would only cost its start); the run's result."""
        p = self.params
        common: dict[str, Any] = dict(tracking=p.tracking, tags={}, progress=False)
        if task == "train":
            return train_run(p, RunSpec(PRETRAIN, 0), out_dir=model_file(root).parent, log_csv=log_file(root),
                             checkpoint_dir=checkpoint(root).parent, init_model=None, **common)
        assert model is not None
        if task == "pseudo":
            return pseudo_label_run(p, "intrada_rank", 0, model_path=model,
                                    out_dir=root / "pseudo" / "intrada_rank" / "s0", **common)
        return evaluate_run(p, RunSpec("source_only", 0), model_path=model,
                            out_dir=root / "eval" / "source_only" / "s0",
                            metrics_path=root / "metrics" / "source_only" / "s0.json", **common)

    def kill(self, task: str, root: Path, kill: dict[str, Any], model: Path | None = None) -> str:
        """Run until the fault kills it; its stdout."""
        proc = self.run(task, root, kill, model)
        assert proc.returncode == SIGKILLED, f"not killed (rc {proc.returncode}): {proc.stderr[-3000:]}"
        return proc.stdout


def tiny_params(raw: dict[str, Any], data: Path) -> dict[str, Any]:
    """params.yaml with tiny sizes on the fixtures in `data` (and CPU, one thread, a log row per step, no
    tracking); everything else as in params.yaml."""
    raw = copy.deepcopy(raw)
    d = raw["data"]
    d["root"] = str(data)
    d["source"].update(root=str(data / "source"), train=None, val=None)
    d["target"].update(root=str(data / "target"))
    d["train_transform"].update(short_edge=[32, 40], crop=[32, 48])
    raw["model"].update(depth=18, width=0.125, groups=4, aspp_rates=[1, 2])
    raw["engine"].update(batch_size=2, grad_accum=1, device="cpu", num_workers=0, log_every=1,
                         checkpoint_every=EVERY, threads=1)
    raw["pretrain"]["steps"] = STEPS
    raw["pseudo"]["intrada_rank"].update(batch_size=2, input_size=None)
    raw["evaluate"].update(batch_size=2, samples=[0], source_val=False, compare_without_tta=False, cycle_pairs=0)
    raw["tracking"]["enabled"] = False
    return raw


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("faults")
    data = tmp / "data"
    write_gta5(data / "source", 4, size=(32, 64), seed=1)
    write_cityscapes(data / "target", {"train": TARGET_TRAIN, "val": TARGET_VAL}, size=(32, 64), seed=2)
    params_path = tmp / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_params(RAW, data), sort_keys=False))
    child = tmp / "child.py"
    child.write_text(CHILD)
    w = World(tmp, params_path, load_params(params_path), child, tmp / "reference")
    result = w.finish("train", w.reference)
    assert result["steps"] == STEPS and result["resumed_from"] == 0
    return w


# ---------------------------------------------------------------------------------------- what a run left behind


def model_file(root: Path) -> Path:
    return root / "models" / "pretrain" / "s0" / "model.pt"


def log_file(root: Path) -> Path:
    return root / "logs" / "pretrain" / "s0.csv"


def checkpoint(root: Path) -> Path:
    return root / "checkpoints" / "pretrain-s0" / "last.pt"


def leftovers(root: Path) -> list[Path]:
    """The temporary files and folders of killed writes (`.<name>.<random>.tmp`) below root."""
    return sorted(p for p in root.rglob(".*.tmp"))


def assert_same_weights(root: Path, reference: Path) -> None:
    """The model root trained equals the uninterrupted run's, tensor by tensor and bit for bit; so does its log."""
    got, want = (torch.load(model_file(r), weights_only=True) for r in (root, reference))
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    assert got["meta"] == want["meta"]
    assert log_file(root).read_bytes() == log_file(reference).read_bytes()


def verified_step(path: Path) -> int | None:
    """The step of the checkpoint at `path` when it is whole and matches its checksum; None when it is refused
    (`CheckpointError`) or absent. A file that loads is a whole checkpoint: it holds every part a resume reads."""
    if not path.is_file():
        return None
    try:
        state = ckpt.load_verified(path)
    except ckpt.CheckpointError:
        return None
    assert {"fingerprint", "code", "step", "networks", "optimizers", "scaler", "method", "hooks", "rng_cpu"} <= set(
        state), f"{path} loads but is not a whole checkpoint"
    return int(state["step"])


def resumable_step(last: Path) -> int:
    """The step a run starting now resumes from: the last checkpoint's, else the one before it's, else 0."""
    for path in (last, ckpt.previous(last)):
        step = verified_step(path)
        if step is not None:
            return step
    return 0


def saved_steps(upto: int) -> list[int]:
    """The steps at which the checkpoint hook has saved once `upto` steps are done."""
    return [k for k in range(1, upto + 1) if k % EVERY == 0 or k == STEPS]


# ------------------------------------------------------------------------------- 1. SIGKILL during training


def kill_point(seed: int) -> tuple[int, str]:
    """A step (0-based) and a place in it, drawn from `seed`."""
    rng = random.Random(seed)
    return rng.randrange(STEPS), rng.choice(WHERE)


@pytest.mark.parametrize("seed", KILL_SEEDS, ids=[f"seed{s}-step{kill_point(s)[0]}-{kill_point(s)[1]}"
                                                  for s in KILL_SEEDS])
def test_a_training_killed_at_a_random_point_resumes_to_the_same_weights(world: World, tmp_path: Path,
                                                                         seed: int) -> None:
    step, where = kill_point(seed)
    world.kill("train", tmp_path, {"at": "step", "step": step, "where": where})
    # what the kill left: the checkpoints saved up to that point, no model
    done = step + 1 if where == "after_checkpoint" else step
    saved = saved_steps(done)
    assert verified_step(checkpoint(tmp_path)) == (saved[-1] if saved else None)
    assert not model_file(tmp_path).exists()
    code = ckpt.source_digest(REPO / "plca")
    result = world.finish("train", tmp_path)
    if ckpt.source_digest(REPO / "plca") == code:  # (plca/ edited meanwhile: the run rightly starts afresh)
        assert result["resumed_from"] == (saved[-1] if saved else 0)
    assert result["steps"] == STEPS
    assert_same_weights(tmp_path, world.reference)
    assert leftovers(tmp_path) == []


#: Writes a training makes, killed halfway through: (id, file name, which write of that name, the step the next start
#: resumes from).
TRAINING_WRITES = [
    ("first-checkpoint", "last.pt", 1, 0),           # no checkpoint yet: the run starts over
    ("second-checkpoint", "last.pt", 2, 2),          # the first moved to last.prev.pt, which serves
    ("second-checksum", "last.pt.sha256", 2, 2),     # last.pt whole but without its checksum: refused
    ("log", "s0.csv", 3, 2),                         # the log of step 3 (the checkpoint of step 2 stands)
    ("model", "model.pt", 1, STEPS),                 # the finished run's model: its last checkpoint has every step
]


@pytest.mark.parametrize(("name", "nth", "resumes"), [c[1:] for c in TRAINING_WRITES],
                         ids=[c[0] for c in TRAINING_WRITES])
def test_a_training_killed_halfway_through_a_write_resumes_and_cleans_up(world: World, tmp_path: Path, name: str,
                                                                         nth: int, resumes: int) -> None:
    out = world.kill("train", tmp_path, {"at": "write", "name": name, "nth": nth, "fraction": 0.5})
    target = Path(json.loads(out.strip().splitlines()[-1])["killed_writing"])
    assert target.name == name
    # the half-written bytes are in a temporary file beside the target, never under its name
    (half,) = [p for p in leftovers(tmp_path) if p.name.startswith(f".{name}.")]
    assert half.parent == target.parent and half.stat().st_size > 0
    last = checkpoint(tmp_path)
    for path in (last, ckpt.previous(last)):  # a checkpoint on disk loads whole, or is refused: never half of one
        verified_step(path)
        if path.is_file():
            assert path.read_bytes() != half.read_bytes()
    if name == "model.pt":
        assert not target.exists()
    assert resumable_step(last) == resumes
    code = ckpt.source_digest(REPO / "plca")
    result = world.here("train", tmp_path)
    if ckpt.source_digest(REPO / "plca") == code:
        assert result["resumed_from"] == resumes
    assert_same_weights(tmp_path, world.reference)
    assert leftovers(tmp_path) == []  # the next start removed the temporary file of the killed write


def test_a_training_killed_between_moving_a_checkpoint_and_its_checksum_starts_over_safely(
        world: World, tmp_path: Path) -> None:
    """`save_verified` moves last.pt to last.prev.pt, then its checksum: killed between the two (at the second
    save), last.prev.pt sits beside no checksum of its own. It is never resumed unchecked: the run resumes from a
    checkpoint that verifies (the stranded checksum vouches for last.prev.pt), to the same weights."""
    out = world.kill("train", tmp_path, {"at": "rename", "nth": 2})
    assert json.loads(out.strip().splitlines()[-1])["killed_renaming"].endswith("last.pt.sha256")
    last = checkpoint(tmp_path)
    assert not last.exists() and ckpt.previous(last).is_file()
    resumes = resumable_step(last)
    assert resumes == 2
    code = ckpt.source_digest(REPO / "plca")
    result = world.here("train", tmp_path)
    if ckpt.source_digest(REPO / "plca") == code:
        assert result["resumed_from"] == resumes
    assert_same_weights(tmp_path, world.reference)
    assert leftovers(tmp_path) == []


class Stop(Exception):
    """Ends a training (or a save) in this process where a kill would, leaving the files as they are."""


def test_a_kill_between_moving_a_checkpoint_and_its_checksum_keeps_a_checkpoint_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by this module: the kill left last.prev.pt (whole) beside the older checkpoint's checksum and its own
    stranded as last.pt.sha256; load_verified refused both and the run lost every step."""
    last = tmp_path / "last.pt"
    for step in (1, 2):
        ckpt.save_verified({"step": step}, last)
    real, calls = ckpt.rename, []

    def rename(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 2:  # the kill, after last.pt moved and before its checksum follows
            raise Stop
        real(src, dst)

    monkeypatch.setattr(ckpt, "rename", rename)
    with pytest.raises(Stop):
        ckpt.save_verified({"step": 3}, last)
    usable = []
    for path in (last, ckpt.previous(last)):
        try:
            usable.append(ckpt.load_verified(path)["step"])
        except (ckpt.CheckpointError, FileNotFoundError):
            pass
    assert usable[:1] == [2]  # the step-2 checkpoint, whole, is on disk: it should be the one to resume


@pytest.mark.parametrize("change", ["params", "code"])
def test_a_checkpoint_resumes_only_under_the_params_and_code_that_wrote_it(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        change: str) -> None:
    import plca.experiment as ex
    from plca.engine.hooks import Hook

    real_hooks = ex.default_hooks

    class StopAfter3(Hook):
        def after_step(self, t: Any) -> None:
            if t.step + 1 == 3:
                raise Stop

    with monkeypatch.context() as m:
        m.setattr(ex, "default_hooks", lambda **kw: [*real_hooks(**kw), StopAfter3()])
        with pytest.raises(Stop):
            world.here("train", tmp_path)
    assert verified_step(checkpoint(tmp_path)) == 2
    other = world
    if change == "params":  # another learning rate: another run
        raw = yaml.safe_load(world.params_path.read_text())
        raw["pretrain"]["optim"]["lr"] *= 2
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        other = World(world.tmp, path, load_params(path), world.child, world.reference)
    else:  # the package's sources changed since the checkpoint was written
        monkeypatch.setattr(ckpt, "source_digest", lambda package: "edited")
    with caplog.at_level("WARNING", logger="plca.engine.hooks"):
        result = other.here("train", tmp_path)
    assert result["resumed_from"] == 0 and result["steps"] == STEPS
    assert ("another configuration" if change == "params" else "written by other code") in caplog.text
    assert str(checkpoint(tmp_path)) in caplog.text


# ------------------------------------------------------------------- 2. SIGKILL during pseudo-label and eval writes


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder`, hidden temporary ones included."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_whole_pseudo_set(set_dir: Path) -> None:
    """A pseudo-label set as `make_pseudo_set` finishes it: every file there and readable, a label per labelled
    image, at the image's size."""
    summary = json.loads((set_dir / "summary.json").read_text())
    labelled = (set_dir / "labelled.txt").read_text().split()
    unlabelled = (set_dir / "unlabelled.txt").read_text().split()
    assert (summary["labelled"], summary["unlabelled"]) == (len(labelled), len(unlabelled))
    assert summary["images"] == TARGET_TRAIN == len(labelled) + len(unlabelled)
    assert sorted(p.stem for p in (set_dir / "labels").glob("*.png")) == sorted(labelled)
    for name in labelled:
        assert read_image(set_dir / "labels" / f"{name}.png", cv2.IMREAD_UNCHANGED).shape == (32, 64)
    assert len((set_dir / "images.csv").read_text().splitlines()) == TARGET_TRAIN + 1
    assert not [p for p in set_dir.rglob(".*")], "a temporary file inside a finished set"


#: Pseudo-label writes killed halfway through a file: (id, file name pattern, which write, a set there before).
PSEUDO_WRITES = [
    ("first-set-mid-label", "*.png", 2, False),
    ("rewrite-mid-label", "*.png", 1, True),
    ("rewrite-mid-summary", "summary.json", 1, True),
]


@pytest.mark.parametrize(("pattern", "nth", "before"), [c[1:] for c in PSEUDO_WRITES],
                         ids=[c[0] for c in PSEUDO_WRITES])
def test_a_killed_pseudo_label_write_never_leaves_a_set_that_looks_whole(world: World, tmp_path: Path, pattern: str,
                                                                         nth: int, before: bool) -> None:
    model = model_file(world.reference)
    set_dir = tmp_path / "pseudo" / "intrada_rank" / "s0"
    old = None
    if before:
        world.here("pseudo", tmp_path, model)
        assert_whole_pseudo_set(set_dir)
        old = snapshot(set_dir)
    world.kill("pseudo", tmp_path, {"at": "write", "name": pattern, "nth": nth, "fraction": 0.5}, model)
    # the set is the previous one, byte for byte, or absent; the half-written file is in the hidden temporary folder
    assert (snapshot(set_dir) if set_dir.exists() else None) == old
    (tmp,) = [p for p in set_dir.parent.iterdir() if p.name.startswith(f".{set_dir.name}.")]
    assert tmp.is_dir() and not (tmp / "summary.json").exists()
    assert [p for p in tmp.rglob(".*.tmp") if p.is_file()], "the killed write left no partial file"
    # the next run writes the set whole (the same bytes as before: the same model labels the same images)
    world.here("pseudo", tmp_path, model)
    assert_whole_pseudo_set(set_dir)
    assert leftovers(set_dir.parent) == []  # the killed write's temporary folder went at the next start
    if old is not None:
        assert snapshot(set_dir) == old


def assert_whole_evaluation(eval_dir: Path) -> None:
    """Every file of an evaluation that is there under its own name is whole: PNGs decode, JSON parses."""
    for path in eval_dir.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".png":
            read_image(path, cv2.IMREAD_UNCHANGED)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npy":
            np.load(path)


#: Evaluation writes killed halfway through a file: (id, file name pattern, which write).
EVAL_WRITES = [
    ("mid-prediction", "*_000*.png", 2),  # a target-val prediction, labelIds/<city>_<seq>_<frame>.png
    ("mid-confusion", "confusion.npy", 1),
    ("mid-metrics", "metrics.json", 1),
]


@pytest.mark.parametrize(("pattern", "nth"), [c[1:] for c in EVAL_WRITES], ids=[c[0] for c in EVAL_WRITES])
def test_a_killed_evaluation_write_leaves_the_previous_file_or_a_whole_one(world: World, tmp_path: Path,
                                                                           pattern: str, nth: int) -> None:
    model = model_file(world.reference)
    eval_dir = tmp_path / "eval" / "source_only" / "s0"
    metrics = tmp_path / "metrics" / "source_only" / "s0.json"
    first = world.here("evaluate", tmp_path, model)
    old = snapshot(eval_dir)
    old_metrics = metrics.read_bytes()
    out = world.kill("evaluate", tmp_path, {"at": "write", "name": pattern, "nth": nth, "fraction": 0.5}, model)
    target = Path(json.loads(out.strip().splitlines()[-1])["killed_writing"])
    assert_whole_evaluation(eval_dir)
    (half,) = target.parent.glob(f".{target.name}.*.tmp")
    assert half.stat().st_size > 0
    # the file being written is absent (a new prediction) or the previous evaluation's, byte for byte
    rel = target.relative_to(eval_dir).as_posix()
    if rel.startswith(f"{PREDICTIONS}/"):  # the folder is emptied first: the prediction is not there at all
        assert not target.exists()
    else:
        assert hashlib.sha256(target.read_bytes()).hexdigest() == old[rel]
    assert snapshot(eval_dir)["metrics.json"] == old["metrics.json"] and metrics.read_bytes() == old_metrics
    # the next run writes every file whole; its predictions folder, which it empties first, keeps no leftover
    assert world.here("evaluate", tmp_path, model) == first
    assert_whole_evaluation(eval_dir)
    assert not list((eval_dir / PREDICTIONS).glob(".*"))
    assert leftovers(tmp_path / "eval") == leftovers(tmp_path / "metrics") == []  # cleaned at the next start
    frames = (world.params.data.target.root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png")
    assert sorted(p.name for p in (eval_dir / PREDICTIONS).glob("*.png")) == sorted(
        f"{p.name.removesuffix('_leftImg8bit.png')}.png" for p in frames)
    assert metrics.read_bytes() == old_metrics


# ------------------------------------------------------------------------------------ 3. bad inputs: params files


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of the parsed params.yaml: the key at dotted `path` set to `value`."""
    *parents, key = path.split(".")

    def edit(raw: dict[str, Any]) -> None:
        node = raw
        for p in parents:
            node = node[p]
        node[key] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, key = path.split(".")

    def edit(raw: dict[str, Any]) -> None:
        node = raw
        for p in parents:
            node = node[p]
        del node[key]

    return edit


@dataclass
class TextEdit:
    """An edit of params.yaml's text (what a parsed mapping cannot hold: a key given twice, broken YAML)."""

    edit: Callable[[str], str]


#: Bad params files: (id, edit of the parsed params.yaml or of its text, what the error says after the file's name).
BAD_PARAMS: list[tuple[str, Callable[[dict[str, Any]], None] | TextEdit, str]] = [
    ("pretrain.steps=-5", _set("pretrain.steps", -5), "params.pretrain: steps must be >= 0, got -5"),
    ("engine.batch_size=0", _set("engine.batch_size", 0), "params.engine: batch_size must be >= 1, got 0"),
    ("engine.grad_accum=0", _set("engine.grad_accum", 0), "params.engine: grad_accum must be >= 1, got 0"),
    ("engine.log_every=0", _set("engine.log_every", 0), "params.engine: log_every must be >= 1, got 0"),
    ("engine.checkpoint_every=0", _set("engine.checkpoint_every", 0),
     "params.engine: checkpoint_every must be >= 1, got 0"),
    ("engine.num_workers=-1", _set("engine.num_workers", -1), "params.engine: num_workers must be >= 0, got -1"),
    ("evaluate.batch_size=0", _set("evaluate.batch_size", 0), "params.evaluate: batch_size must be >= 1, got 0"),
    ("plca.alpha=1.5", _set("methods.plca.alpha", 1.5), "params.methods.plca + params.variants.fass.train.options: "
                                                          "alpha must be in [0, 1]"),
    ("plca.tau=0", _set("methods.plca.tau", 0), "params.methods.plca + params.variants.fass.train.options: "
                                                "tau must be > 0"),
    ("pseudo.ratio=1.5", _set("pseudo.intrada_rank.options.ratio", 1.5),
     "params.pseudo.intrada_rank.options: ratio: expected a share in (0, 1), got 1.5"),
    ("crop=0", _set("data.train_transform.crop", [0, 10]), "params.data.train_transform: crop must be a positive"),
    ("seeds-repeat", _set("seeds", [0, 0]), "params.seeds: expected distinct seeds >= 0, got [0, 0]"),
    ("unknown-key", _set("engine.batch_sise", 4), "params.engine: unknown key(s) ['batch_sise']"),
    ("unknown-option", _set("variants.plca.train.options", {"alpah": 0.3}),
     "params.methods.plca + params.variants.plca.train.options: unknown key(s) ['alpah']"),
    ("unknown-section", _set("table1", {}), "params: unknown key(s) ['table1']"),
    ("missing-key", _drop("data.source.format"), "params.data.source: missing required key 'format'"),
    ("type-int", _set("engine.batch_size", "four"), "params.engine.batch_size: expected an integer, got 'four'"),
    ("type-float-for-int", _set("model.depth", 18.5), "params.model.depth: expected an integer, got 18.5"),
    ("type-bool", _set("engine.amp", "yes"), "params.engine.amp: expected true or false, got 'yes'"),
    ("type-number", _set("adapt.optim.lr", "fast"), "params.adapt.optim.lr: expected a number, got 'fast'"),
    ("type-pair", _set("data.eval_size", [10]), "params.data.eval_size: expected 2 items, got 1"),
    ("choice", _set("data.source.format", "kitti"), "params.data.source.format: expected one of ['gta5', "),
    ("duplicate-key", TextEdit(lambda t: t.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\nseeds: [3]")),
     "not valid YAML: key 'seeds' given twice"),
    ("duplicate-nested-key", TextEdit(lambda t: t.replace("  grad_accum: 1\n", "  grad_accum: 1\n  grad_accum: 2\n")),
     "not valid YAML: key 'grad_accum' given twice"),
    ("not-yaml", TextEdit(lambda t: t.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2")), "not valid YAML"),
    ("not-a-mapping", TextEdit(lambda t: "- profile\n- embedded\n"), "expected a mapping at the top level"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS])
def test_a_bad_params_file_stops_with_the_file_and_the_key(
        tmp_path: Path, edit: Callable[[dict[str, Any]], None] | TextEdit, message: str) -> None:
    path = tmp_path / "params.yaml"
    if isinstance(edit, TextEdit):
        text = (REPO / "params.yaml").read_text()
        edited = edit.edit(text)
        assert edited != text
        path.write_text(edited)
    else:
        raw = copy.deepcopy(RAW)
        edit(raw)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_the_unedited_params_file_loads(tmp_path: Path) -> None:
    """The table's baseline: params.yaml copied and dumped as the table does loads, so each error is the edit's."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(RAW), sort_keys=False))
    load_params(path)
    path.write_text((REPO / "params.yaml").read_text())
    load_params(path)


def test_a_missing_params_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: file not found"):
        load_params(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------- 3. bad inputs: images, labels


def _gta5_label(root: Path, values: np.ndarray) -> None:
    pal = np.zeros((256, 3), np.uint8)
    write_palette_png(root / "labels" / "00002.png", values, pal)


def _label_with(value: int, size: tuple[int, int] = (16, 24)) -> np.ndarray:
    ids = np.full(size, 7, np.uint8)
    ids[0, 0] = value
    return ids


@dataclass
class BadInput:
    """A fixture in a real layout with one fault. `breaks(root)` damages it and returns the file to be named;
    `reader(root)` reads it the way training does (None: readers do not see this fault); `error` is the reader's
    exception type; `verify`: the text `verify_dataset` reports beside the file (None: verification does not see
    it)."""

    layout: str
    breaks: Callable[[Path], Path]
    reader: Callable[[Path], Any] | None
    error: type[Exception] | None
    verify: str | None


def _write(layout: str, root: Path) -> None:
    if layout == "gta5":
        write_gta5(root, 3, size=(16, 24), seed=5)
    elif layout == "synthia":
        write_synthia(root, 3, size=(16, 24), seed=5)
    else:
        write_cityscapes(root, {"val": 3}, size=(16, 24), seed=5)


def _read_all(reader: Any) -> None:
    for i in range(len(reader)):
        reader.read(i)


def _cs_val(root: Path, i: int = 1) -> tuple[Path, Path]:
    return cityscapes_paths(root, "val", ("frankfurt", "lindau")[i % 2], i // 2, 19 + 10 * i)


def _gone(path: Path) -> Path:
    path.unlink()
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    truncate_file(path, 0.5)
    return path


def _grey(path: Path, values: np.ndarray) -> Path:
    write_grey_png(path, values)
    return path


GTA5 = lambda root: _read_all(GTA5Reader(root))  # noqa: E731
SYNTHIA = lambda root: _read_all(SynthiaReader(root))  # noqa: E731
CITYSCAPES = lambda root: _read_all(CityscapesReader(root, "val"))  # noqa: E731
RANDOM_BYTES = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))


def _gta5_out_of_table(root: Path) -> Path:
    _gta5_label(root, _label_with(77))
    return root / "labels" / "00002.png"


def _synthia_out_of_table(root: Path) -> Path:
    path = root / "GT" / "LABELS" / "0000001.png"
    gt = np.zeros((16, 24, 3), np.uint16)
    gt[..., 0] = _label_with(40)
    write_rgb_png(path, gt)
    return path


def _orphan_label(root: Path) -> Path:
    label = root / "labels" / "00009.png"
    label.write_bytes((root / "labels" / "00001.png").read_bytes())
    return label


BAD_INPUTS: dict[str, BadInput] = {
    "gta5-truncated-image": BadInput("gta5", lambda r: _truncated(r / "images" / "00002.png"), GTA5, DataError,
                                     "cannot decode image PNG"),
    "gta5-random-bytes-image": BadInput("gta5", lambda r: _bytes(r / "images" / "00002.png", RANDOM_BYTES), GTA5,
                                        DataError, "not a PNG file"),
    "gta5-empty-image": BadInput("gta5", lambda r: _bytes(r / "images" / "00002.png", b""), GTA5, DataError,
                                 "not a PNG file"),
    "gta5-truncated-label": BadInput("gta5", lambda r: _truncated(r / "labels" / "00002.png"), GTA5, DataError,
                                     "cannot decode label PNG"),
    "gta5-random-bytes-label": BadInput("gta5", lambda r: _bytes(r / "labels" / "00002.png", RANDOM_BYTES), GTA5,
                                        DataError, "not a PNG file"),
    "gta5-label-outside-table": BadInput("gta5", _gta5_out_of_table, GTA5, LabelError, "are outside the gta5"),
    "gta5-label-wrong-size": BadInput("gta5", lambda r: _grey(r / "labels" / "00002.png", np.full((8, 12), 7,
                                                                                                  np.uint8)),
                                      GTA5, DataError, None),  # GTA5 has such frames: verification reports them
    "gta5-image-without-label": BadInput("gta5", lambda r: _gone(r / "labels" / "00002.png"), GTA5,
                                         FileNotFoundError, "no matching label"),
    "gta5-label-without-image": BadInput("gta5", _orphan_label, None, None, "no matching image"),
    "cityscapes-truncated-image": BadInput("cityscapes", lambda r: _truncated(_cs_val(r)[0]), CITYSCAPES, DataError,
                                           "cannot decode image PNG"),
    "cityscapes-random-bytes-label": BadInput("cityscapes", lambda r: _bytes(_cs_val(r)[1], RANDOM_BYTES),
                                              CITYSCAPES, DataError, "not a PNG file"),
    "cityscapes-label-outside-table": BadInput("cityscapes", lambda r: _grey(_cs_val(r)[1], _label_with(200)),
                                               CITYSCAPES, LabelError, "are outside the cityscapes"),
    "cityscapes-label-wrong-size": BadInput("cityscapes", lambda r: _grey(_cs_val(r)[1], np.full((8, 12), 7,
                                                                                                  np.uint8)),
                                            CITYSCAPES, DataError, "label is 12x8 but its image"),
    "cityscapes-label-in-colour": BadInput("cityscapes", lambda r: _colour_label(_cs_val(r)[1]), CITYSCAPES,
                                           DataError, "Cityscapes labelIds has shape"),
    "cityscapes-image-without-label": BadInput("cityscapes", lambda r: _gone(_cs_val(r)[1]), CITYSCAPES,
                                               FileNotFoundError, "no matching label"),
    "cityscapes-label-without-image": BadInput("cityscapes", lambda r: _cs_orphan(r), None, None,
                                               "no matching image"),
    "synthia-truncated-label": BadInput("synthia", lambda r: _truncated(r / "GT" / "LABELS" / "0000001.png"), SYNTHIA,
                                        DataError, "cannot decode label PNG"),
    "synthia-label-outside-table": BadInput("synthia", _synthia_out_of_table, SYNTHIA, LabelError,
                                            "are outside the synthia"),
    "synthia-image-without-label": BadInput("synthia", lambda r: _gone(r / "GT" / "LABELS" / "0000001.png"), SYNTHIA,
                                            FileNotFoundError, "no matching label"),
}


def _colour_label(path: Path) -> Path:
    write_rgb_png(path, np.full((16, 24, 3), 128, np.uint8))
    return path


def _cs_orphan(root: Path) -> Path:
    image, label = _cs_val(root, 1)
    image.unlink()
    return label


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("not_utf8", [False, True], ids=["utf8", "non-utf8-folder"])
def test_a_bad_image_or_label_is_refused_naming_the_file(tmp_path: Path, case: str, not_utf8: bool) -> None:
    bad = BAD_INPUTS[case]
    root = tmp_path / "data"
    _write(bad.layout, root)
    path = bad.breaks(root)
    if not_utf8:  # the folder renamed to hold the byte 0xff (written first: the fixture writers call cv2.imwrite)
        renamed = Path(os.fsdecode(os.fsencode(tmp_path) + b"/data\xff"))
        root.rename(renamed)
        root, path = renamed, renamed / path.relative_to(root)
    shown = show_path(path)
    assert ("\\xff" in shown) == not_utf8
    if bad.reader is not None:
        assert bad.error is not None
        with pytest.raises(bad.error) as err:
            bad.reader(root)
        assert shown in str(err.value), f"{case}: the reader's error does not name {shown}: {err.value}"
        str(err.value).encode("utf-8")  # printable: no lone surrogate
    report = verify_dataset(root, bad.layout, None, VerifyConfig(workers=1))
    if bad.verify is None:
        assert report.ok
        return
    named = [e for e in report.errors if shown in e]
    assert named and any(bad.verify in e for e in named), f"{case}: {report.errors}"
    with pytest.raises(DatasetError) as err:
        report.raise_if_failed()
    assert shown in str(err.value)


def test_the_unbroken_fixtures_read_and_verify(tmp_path: Path) -> None:
    """The table's baseline: each layout's fixture, unbroken, reads and verifies."""
    for layout, read in (("gta5", GTA5), ("synthia", SYNTHIA), ("cityscapes", CITYSCAPES)):
        _write(layout, tmp_path / layout)
        read(tmp_path / layout)
        verify_dataset(tmp_path / layout, layout, None, VerifyConfig(workers=1)).raise_if_failed()
