"""Training on several processes (gloo, on the CPU): each rank draws its share of the global batch, gradients are
averaged, only rank 0 writes, and a killed multi-process run resumes from rank 0's checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import TCFG, cfg, hooks, make, streams

from plca.engine.distributed import DistConfig, ShardSampler, shutdown
from plca.engine.hooks import Hook
from plca.engine.optim import OptimConfig
from plca.engine.streams import StepBatchSampler
from plca.engine.trainer import Trainer

WORLD = 2
STEPS = 4


def test_ranks_share_each_micro_batch_and_together_draw_the_one_process_batch() -> None:
    one = list(StepBatchSampler(9, 4, 2, seed=1, stream_id=0, start_step=0, end_step=3))
    shares = [list(ShardSampler(StepBatchSampler(9, 4, 2, seed=1, stream_id=0, start_step=0, end_step=3),
                                DistConfig(rank=r, world_size=WORLD))) for r in range(WORLD)]
    assert all(len(s) == len(one) for s in shares)
    for i, keys in enumerate(one):
        assert shares[0][i] + shares[1][i] == keys and len(shares[0][i]) == 2


def test_a_batch_that_does_not_split_over_the_processes_is_named() -> None:
    with pytest.raises(ValueError, match="engine.batch_size 3 does not split evenly over 2 processes"):
        Trainer(replace(cfg(batch_size=3), dist=DistConfig(0, 2)))
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        DistConfig(rank=2, world_size=2)


class StopAt(Hook):
    """Ends the run (as a kill would) once `step` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step + 1 == self.step:
            raise KeyboardInterrupt


def _config(world: int, rank: int, **kw):  # noqa: ANN202
    c = cfg(steps=STEPS, batch_size=4, checkpoint_every=2, optim=OptimConfig(lr=0.05), **kw)
    return replace(c, dist=DistConfig(rank=rank, world_size=world))


def _train(out: Path, method_name: str, options: dict, world: int, rank: int, stop_at: int | None = None,
           normalise: str = "rank") -> None:
    model, method = make(method_name, options)
    method.set_normalization(TCFG)  # as train_run does (DACS mixes and jitters pixel values)
    c = _config(world, rank, normalise=normalise)
    hs = hooks(out, "run", c, log_csv=rank == 0)
    if rank != 0:  # as default_hooks(main=False): resume from rank 0's checkpoint, write nothing
        hs[-1].saves = False
        hs = [h for h in hs if h.name != "log"] + []
    if stop_at is not None:
        hs = hs[:-1] + [hs[-1], StopAt(stop_at)]
    try:
        trainer = Trainer(c)
        trainer.fit(method, streams(), hs)
    except KeyboardInterrupt:
        return
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / f"weights-{world}-{rank}.pt")
    torch.save(trainer.step_terms, out / f"terms-{world}-{rank}.pt")


def _worker(rank: int, out: Path, method_name: str, options: dict, stop_at: int | None, normalise: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        _train(out, method_name, options, WORLD, rank, stop_at, normalise)
    finally:
        shutdown()


def run_ranks(out: Path, method_name: str, options: dict, stop_at: int | None = None,
              normalise: str = "rank") -> None:
    (out / "rendezvous").unlink(missing_ok=True)
    mp.spawn(_worker, args=(out, method_name, options, stop_at, normalise), nprocs=WORLD, join=True)


def weights(out: Path, world: int, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights-{world}-{rank}.pt")


@pytest.fixture(scope="module")
def ce_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source-only with CE alone, whose per-rank means average to the global mean (every pixel labelled):
    2 processes, and one process on the same global batch."""
    options = {"lovasz": False}
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    run_ranks(two, "source_only", options)
    torch.set_num_threads(1)
    _train(one, "source_only", options, 1, 0)
    return {"two": two, "one": one}


def test_two_processes_end_with_the_weights_of_one(ce_runs: dict[str, Path]) -> None:
    two, one = ce_runs["two"], ce_runs["one"]
    w0, w1, ref = weights(two, WORLD, 0), weights(two, WORLD, 1), weights(one, 1)
    for name, value in ref.items():
        assert torch.equal(w0[name], w1[name]), name  # every rank steps with the same averaged gradient
        torch.testing.assert_close(w0[name], value, rtol=1e-5, atol=1e-6, msg=name)  # float sums in another order
    assert any(not torch.equal(ref[k], make("source_only")[0].state_dict()[k]) for k in ref)  # it trained
    # the logged terms are the global batch's, in the one-process order (the log's columns)
    two_terms, one_terms = torch.load(two / f"terms-{WORLD}-0.pt"), torch.load(one / "terms-1-0.pt")
    assert list(two_terms) == list(one_terms)
    assert two_terms["ce"] == pytest.approx(one_terms["ce"], rel=1e-5)


def test_only_rank_0_writes(ce_runs: dict[str, Path]) -> None:
    two = ce_runs["two"]
    assert (two / "run.pt").is_file() and (two / "run.csv").is_file()
    assert len((two / "run.csv").read_text().splitlines()) == STEPS + 1


def test_a_killed_multi_process_run_resumes_from_rank_0s_checkpoint(ce_runs: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    run_ranks(tmp_path, "source_only", {"lovasz": False}, stop_at=3)  # killed after step 3, saved at step 2
    assert not (tmp_path / f"weights-{WORLD}-0.pt").exists()
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 2
    run_ranks(tmp_path, "source_only", {"lovasz": False})
    resumed, uninterrupted = weights(tmp_path, WORLD), weights(ce_runs["two"], WORLD)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize("method_name", ["source_only", "plca"])
def test_global_normalisation_steps_as_one_process(tmp_path: Path, method_name: str) -> None:
    """engine.normalise: global: CE over all labelled pixels, the associations over all positives and
    Lovasz-softmax over the gathered batch of all processes. 2 processes end with the one-process weights up to
    float rounding (measured 1.2e-7), where each process normalising its own share ends about 1e-3 away."""
    for mode in ("global", "rank"):
        (tmp_path / mode).mkdir()
        run_ranks(tmp_path / mode, method_name, {}, normalise=mode)
    (tmp_path / "one").mkdir()
    torch.set_num_threads(1)
    _train(tmp_path / "one", method_name, {}, 1, 0)
    ref = weights(tmp_path / "one", 1)
    w0, w1 = weights(tmp_path / "global", WORLD, 0), weights(tmp_path / "global", WORLD, 1)
    for name, value in ref.items():
        assert torch.equal(w0[name], w1[name]), name
        torch.testing.assert_close(w0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    per_rank = weights(tmp_path / "rank", WORLD)
    assert max((per_rank[k] - ref[k]).abs().max().item() for k in ref) > 1e-4


def _lovasz_worker(rank: int, out: Path) -> None:
    from plca.engine.distributed import Reducer
    from plca.losses import lovasz_softmax

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        probs, labels = _lovasz_inputs()
        mine = probs[2 * rank:2 * rank + 2].clone().requires_grad_()
        gathered, all_labels = Reducer(WORLD).gather(mine, labels[2 * rank:2 * rank + 2])
        loss = lovasz_softmax(gathered, all_labels)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad / WORLD}, out / f"lovasz-{rank}.pt")
    finally:
        shutdown()


def _lovasz_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(4, 5, 6, 7, generator=g, dtype=torch.float64).softmax(1)  # no two errors alike
    labels = torch.randint(0, 5, (4, 6, 7), generator=g)
    labels[0, :2] = 255
    return probs, labels


def test_lovasz_over_the_gathered_batch_has_the_one_process_gradient(tmp_path: Path) -> None:
    """Each process's share of the gathered Lovasz-softmax gradient, averaged as the engine averages gradients,
    is the one-process gradient of those images, and the loss is the one-process loss."""
    from plca.losses import lovasz_softmax

    mp.spawn(_lovasz_worker, args=(tmp_path,), nprocs=WORLD, join=True)
    probs, labels = _lovasz_inputs()
    probs.requires_grad_()
    one = lovasz_softmax(probs, labels)
    one.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"lovasz-{rank}.pt")
        torch.testing.assert_close(got["loss"], one.detach())
        torch.testing.assert_close(got["grad"], probs.grad[2 * rank:2 * rank + 2])


@pytest.mark.parametrize(("method_name", "options"), [("advent", {"multi_level": False}), ("dacs", {})])
def test_discriminators_and_ema_teachers_train_on_two_processes(tmp_path: Path, method_name: str,
                                                                 options: dict) -> None:
    """ADVENT's discriminators (their own optimisers) and DACS's EMA teacher (mixing with its own random draws):
    every process steps to the same weights, and the run trains."""
    run_ranks(tmp_path, method_name, options)
    w0, w1 = weights(tmp_path, WORLD, 0), weights(tmp_path, WORLD, 1)
    start = make(method_name, options)[0].state_dict()
    for name, value in w0.items():
        assert torch.equal(value, w1[name]), name
    assert any(not torch.equal(w0[k], start[k]) for k in w0)
    assert (tmp_path / "run.pt").is_file()


def _grad_worker(rank: int, out: Path) -> None:
    from plca.engine.distributed import average_gradients

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        used, unused, once = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        used.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            once.grad = torch.full((3,), 4.0)
        average_gradients([used, unused, once], WORLD)
        torch.save({"used": used.grad, "unused": unused.grad, "once": once.grad}, out / f"grads-{rank}.pt")
    finally:
        shutdown()


def test_a_parameter_without_a_gradient_anywhere_keeps_none(tmp_path: Path) -> None:
    """As in one process, where an optimiser leaves a parameter without a gradient alone (no weight decay, no
    momentum step); one with a gradient on some process only counts as zeros on the others."""
    mp.spawn(_grad_worker, args=(tmp_path,), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"grads-{rank}.pt")
        assert torch.equal(got["used"], torch.full((3,), 1.5))
        assert got["unused"] is None
        assert torch.equal(got["once"], torch.full((3,), 2.0))


LAUNCH = """
import sys
from dataclasses import replace
sys.path.insert(0, "stages")
import _common
from plca.params import load_params
params = load_params("params.yaml")
params = replace(params, engine=replace(params.engine, processes=2))
_common.distributed(params, [sys.argv[1], "--run", "plca", "--stage", "adapt"])
print("not re-run under torchrun")
"""
# one write(2) per line: the two processes share the pipe, and print() writes a line in pieces that interleave
SHOW_RANK = ('import os, sys\nos.write(1, f"rank {os.environ[\'RANK\']} of {os.environ[\'WORLD_SIZE\']}: "'
             '\n         f"{\' \'.join(sys.argv[1:])}\\n".encode())\n')


def test_a_stage_asking_for_two_processes_runs_itself_again_under_torchrun(tmp_path: Path) -> None:
    """engine.processes: 2, started without torchrun: the stage's command runs again under torchrun on this
    machine, with 2 processes (here a script that prints the rank torchrun gives it)."""
    script = tmp_path / "show_rank.py"
    script.write_text(SHOW_RANK)
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(LAUNCH), str(script)], cwd=repo,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in res.stdout
    # the stage's own options reach it whole (torchrun's parser once took --run for its --run-path)
    assert sorted(line for line in res.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0 of 2: --run plca --stage adapt", "rank 1 of 2: --run plca --stage adapt"]
    assert "not re-run under torchrun" not in res.stdout
