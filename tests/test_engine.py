"""The training engine: deterministic streams, the loop and each hook alone (schedule, EMA, log, checkpoint and exact
resume, also of a method with two networks and two optimisers), accumulation, tracking failures."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from plca.data.datasets import Sample
from plca.data.transforms import TransformConfig, train_transform
from plca.engine import checkpoint as ckpt
from plca.engine.contract import EMASpec, Method, StepOutput
from plca.engine.hooks import CheckpointHook, EMAHook, Hook, LogHook, ScheduleHook, default_hooks
from plca.engine.optim import OptimConfig, poly_factor
from plca.engine.streams import KeyedDataset, StepBatchSampler
from plca.engine.tracking import Tracker, TrackingConfig
from plca.engine.trainer import EngineConfig, TrainConfig, Trainer, fingerprint
from plca.losses import entropy_loss
from plca.methods import build_method
from plca.models import LOGITS, upsample
from plca.models.deeplabv2 import DeepLabV2Config, build_model

TINY_MODEL = DeepLabV2Config(num_classes=19, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2))
TCFG = TransformConfig(short_edge=(32, 40), crop=(32, 48), flip=True)


class MemoryReader:
    """A reader over random images with blocky labels, in memory."""

    def __init__(self, n: int, seed: int, labels: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 32, 48, 3), dtype=np.uint8)
        blocks = rng.integers(0, 19, (n, 4, 6)).astype(np.uint8)
        self.labels = np.kron(blocks, np.ones((8, 8), np.uint8)) if labels else None
        self.names = [f"img{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> Sample:
        return Sample(image=self.images[i], label=None if self.labels is None else self.labels[i], name=self.names[i])


def streams(seed: int = 0) -> dict[str, KeyedDataset]:
    tf = lambda s, rng: train_transform(s, TCFG, rng)  # noqa: E731
    return {"source": KeyedDataset(MemoryReader(5, 1), tf, seed, 0),
            "target": KeyedDataset(MemoryReader(4, 2, labels=False), tf, seed, 1)}


def make(method: str = "plca", options: dict | None = None):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    return model, build_method(method, model, options or {})


def cfg(**kw) -> TrainConfig:
    run = dict(steps=6, seed=3, optim=OptimConfig(lr=0.01))
    engine = dict(batch_size=2, log_every=1, checkpoint_every=2, device="cpu")
    for k, v in kw.items():
        (run if k in run else engine)[k] = v
    return TrainConfig(**run, engine=EngineConfig(**engine))


def hooks(tmp_path: Path, name: str, c: TrainConfig, fp: str = "f", log_csv: bool = True,
          tracker: Tracker | None = None, extra: tuple[Hook, ...] = ()) -> list[Hook]:
    """The pipeline's hooks for a test run (checkpoint <name>.pt, log <name>.csv), `extra` before the checkpoint."""
    hs = default_hooks(steps_name=name, log_every=c.engine.log_every, checkpoint_every=c.engine.checkpoint_every,
                       checkpoint_path=tmp_path / f"{name}.pt", fingerprint=fp,
                       log_csv=tmp_path / f"{name}.csv" if log_csv else None, tracker=tracker, progress=False)
    return hs[:-1] + list(extra) + hs[-1:]


def fit(tmp_path: Path, name: str, method: Method, c: TrainConfig | None = None, **kw) -> tuple[Trainer, list]:
    """Train with the pipeline's hooks; returns the trainer and the log rows."""
    c = c or cfg()
    hs = hooks(tmp_path, name, c, **kw)
    trainer = Trainer(c)
    trainer.result = trainer.fit(method, streams(), hs)
    return trainer, next(h for h in hs if isinstance(h, LogHook)).rows


def test_step_sampler_is_a_function_of_the_step() -> None:
    full = StepBatchSampler(7, 3, 2, seed=1, stream_id=0, start_step=0, end_step=5)
    late = StepBatchSampler(7, 3, 2, seed=1, stream_id=0, start_step=3, end_step=5)
    assert list(full)[6:] == list(late)
    keys = [k for batch in full for k in batch]
    # every item is seen once per epoch of 7 samples, and the sample counter runs on
    first_epoch = [i for i, k in keys if k < 7]
    assert sorted(first_epoch) == list(range(7))
    assert [k for _, k in keys] == list(range(5 * 2 * 3))
    other_seed = StepBatchSampler(7, 3, 2, seed=2, stream_id=0, start_step=0, end_step=5)
    assert list(other_seed) != list(full)


def test_lr_follows_poly_and_losses_are_logged(tmp_path: Path) -> None:
    model, method = make("source_only", {"lovasz": True})
    _, rows = fit(tmp_path, "log", method, cfg(steps=4, optim=OptimConfig(lr=0.1, poly_horizon=8)))
    lrs = [row["lr"] for row in rows]
    assert lrs == pytest.approx([0.1 * poly_factor(s, 8, 0.9) for s in range(4)])
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].split(",") == ["step", "lr", "loss", "ce", "lovasz"]
    assert len(lines) == 5
    assert all(np.isfinite(row["loss"]) for row in rows)


class Kill(Exception):
    pass


class KillAfter(Hook):
    """Raises after `step` steps are done, as a killed process stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step + 1 == self.step:
            raise Kill


def assert_killed_run_resumes(tmp_path: Path, make_method, c: TrainConfig, kill_at: int, saved_at: int) -> None:
    """Train uninterrupted; train again, killed after `kill_at` steps; resume in a "fresh process" (other init):
    every network's weights, every optimiser's state and the log equal the uninterrupted run's, bit for bit."""
    nets_a, method_a = make_method()
    trainer_a, rows_a = fit(tmp_path, "a", method_a, c)
    _, method_b = make_method()
    with pytest.raises(Kill):
        fit(tmp_path, "b", method_b, c, extra=(KillAfter(kill_at),))
    assert ckpt.load(tmp_path / "b.pt")["step"] == saved_at
    torch.manual_seed(123)  # a fresh process would rebuild everything from another random state
    nets_c, method_c = make_method()
    trainer_c, rows_c = fit(tmp_path, "b", method_c, c)
    assert trainer_c.result.resumed_from == saved_at
    for key in nets_a:
        for (name, pa), pc in zip(nets_a[key].state_dict().items(), nets_c[key].state_dict().values(), strict=True):
            assert torch.equal(pa, pc), f"{key}.{name}"
    for key, opt in trainer_a.optimizers.items():
        for sa, sc in zip(opt.state.values(), trainer_c.optimizers[key].state.values(), strict=True):
            for k in sa:
                assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sc[k])), f"{key} optimiser state {k}"
    assert [r["loss"] for r in rows_c] == [r["loss"] for r in rows_a]
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "a.csv").read_text()


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    def make_plca():
        model, method = make()
        return {"model": model}, method

    # killed after step 5: its last checkpoint was written after step 4
    assert_killed_run_resumes(tmp_path, make_plca, cfg(), kill_at=5, saved_at=4)


@dataclass
class TwoNetConfig:
    w_adv: float = 0.01
    disc_optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.99),
                                                                        weight_decay=0.0))


class TwoNetMethod(Method):
    """A segmenter (SGD, the phase's optimiser, head at 10x) and a discriminator of its target predictions (Adam,
    betas 0.9/0.99, its own lr): an AdaptSegNet-shaped method written for the engine's tests, with a running count
    as its own state."""

    name = "two_net"
    streams = ("source", "target")

    def __init__(self, model: torch.nn.Module, cfg: TwoNetConfig) -> None:
        super().__init__(model, cfg)
        self.disc = torch.nn.Sequential(torch.nn.Conv2d(19, 8, 3, padding=1), torch.nn.LeakyReLU(0.2),
                                        torch.nn.Conv2d(8, 1, 3, padding=1))
        self.seen = 0

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "disc": self.disc}

    def optimizers(self, base: OptimConfig) -> dict[str, OptimConfig]:
        return {"model": replace(base, head_lr_mult=10.0), "disc": self.cfg.disc_optim}

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        ls = self.model(batch["source_image"])[LOGITS]
        lt = self.model(batch["target_image"])[LOGITS]
        ce = torch.nn.functional.cross_entropy(upsample(ls, tuple(batch["source_label"].shape[-2:])),
                                               batch["source_label"], ignore_index=255)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        for p in self.disc.parameters():  # the generator's term must not train the discriminator
            p.requires_grad_(False)
        d_t = self.disc(lt.softmax(1))
        adv = bce(d_t, torch.zeros_like(d_t))
        for p in self.disc.parameters():
            p.requires_grad_(True)
        d_s, d_t = self.disc(ls.detach().softmax(1)), self.disc(lt.detach().softmax(1))
        disc = bce(d_s, torch.zeros_like(d_s)) + bce(d_t, torch.ones_like(d_t))
        self.seen += len(batch["source_image"])
        return StepOutput(ce + self.cfg.w_adv * adv + disc, {"adv": float(adv.detach()), "disc": float(disc.detach())})

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


def test_two_network_method_resumes_to_bit_identical_weights(tmp_path: Path) -> None:
    def make_two():
        torch.manual_seed(0)
        model = build_model(TINY_MODEL)
        method = TwoNetMethod(model, TwoNetConfig())
        return {"model": model, "disc": method.disc}, method

    c = cfg(steps=5, checkpoint_every=2, optim=OptimConfig(lr=0.01, poly_horizon=10))
    assert_killed_run_resumes(tmp_path, make_two, c, kill_at=3, saved_at=2)
    # both optimisers are logged, each with its own settings and schedule
    header = (tmp_path / "a.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "lr", "lr/disc"]
    rows = [dict(zip(header, map(float, line.split(",")), strict=True))
            for line in (tmp_path / "a.csv").read_text().splitlines()[1:]]
    # the discriminator's schedule is its own: poly over the run's 5 steps, the segmenter's over 10
    assert [r["lr/disc"] for r in rows] == pytest.approx([1e-3 * poly_factor(s, 5, 0.9) for s in range(5)])
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * poly_factor(s, 10, 0.9) for s in range(5)])
    nets, method = make_two()
    trainer, _ = fit(tmp_path, "c", method, c)
    disc_opt, seg_opt = trainer.optimizers["disc"], trainer.optimizers["model"]
    assert isinstance(disc_opt, torch.optim.Adam) and disc_opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert isinstance(seg_opt, torch.optim.SGD)
    assert [g["initial_lr"] for g in seg_opt.param_groups] == [0.01, pytest.approx(0.1)]
    assert method.seen == 5 * 2


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path: Path, caplog) -> None:
    _, method = make("source_only")
    fit(tmp_path, "c", method, cfg(steps=2), fp="old")
    assert ckpt.load(tmp_path / "c.pt")["fingerprint"] == "old"
    _, method = make("source_only")
    trainer, _ = fit(tmp_path, "c", method, cfg(steps=2), fp="new")
    assert trainer.result.resumed_from == 0
    assert "another configuration" in caplog.text


def test_a_finished_run_resumed_trains_no_more(tmp_path: Path) -> None:
    """The last step is checkpointed too: a stage of several seeds killed after the first gets that seed's
    trained network back without training it again."""
    model, method = make("source_only")
    fit(tmp_path, "done", method, cfg(steps=3))
    assert ckpt.load(tmp_path / "done.pt")["step"] == 3
    torch.manual_seed(7)
    model2, method2 = make("source_only")
    steps: list[int] = []

    class Count(Hook):
        def after_step(self, t: Trainer) -> None:
            steps.append(t.step)

    trainer, rows = fit(tmp_path, "done", method2, cfg(steps=3), extra=(Count(),))
    assert steps == [] and trainer.result.resumed_from == 3 and len(rows) == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    def grads(batch_size: int, accum: int) -> list[torch.Tensor]:
        model, method = make("source_only", {"lovasz": False})
        c = cfg(steps=1, batch_size=batch_size, grad_accum=accum,
                optim=OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.0))
        before = [p.detach().clone() for p in model.parameters()]
        fit(tmp_path, f"b{batch_size}", method, c)
        return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]

    # blocky labels have no ignore pixels after a crop inside the image: CE means over equal pixel counts
    g4, g22 = grads(4, 1), grads(2, 2)
    for a, b in zip(g4, g22, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_method_without_its_stream_is_refused(tmp_path: Path) -> None:
    _, method = make("plca")
    with pytest.raises(ValueError, match="needs stream"):
        Trainer(cfg()).fit(method, {"source": streams()["source"]}, hooks(tmp_path, "c", cfg()))


def test_checkpoint_between_logged_steps_resumes_the_partial_log_interval(tmp_path: Path) -> None:
    """A checkpoint need not fall on a logged step: the log hook's running sums travel in it."""
    def make_src():
        model, method = make("source_only")
        return {"model": model}, method

    assert_killed_run_resumes(tmp_path, make_src, cfg(steps=6, log_every=3, checkpoint_every=2), kill_at=5,
                              saved_at=4)


def test_hook_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        LogHook(0)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        CheckpointHook(Path("x.pt"), "f", 0)


def test_unknown_method_and_option_are_named() -> None:
    model = build_model(TINY_MODEL)
    with pytest.raises(ValueError, match="unknown method 'adabn'"):
        build_method("adabn", model, {})
    with pytest.raises(ValueError, match="unknown key"):
        build_method("plca", model, {"alpah": 0.3}, where="params.variants.plca.options")


def test_fingerprint_is_stable_and_sensitive() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_corrupt_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="last.pt: not a readable checkpoint"):
        ckpt.load(bad)


def test_tracking_failure_warns_and_keeps_the_result(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # a store below a regular file cannot be created
    bad = TrackingConfig(uri=f"sqlite:///{blocker}/sub/mlruns.db", artifact_root=str(tmp_path / "art"))
    _, method = make("source_only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(bad, "run") as tracker:
            trainer, rows = fit(tmp_path, "c", method, cfg(steps=2), tracker=tracker)
    assert trainer.result.steps == 2 and len(rows) == 2
    assert any("MLflow tracking disabled" in str(w.message) for w in caught)


def test_tracker_records_params_metrics_and_tags(tmp_path: Path) -> None:
    import mlflow

    good = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db", experiment="t", artifact_root=str(tmp_path / "a"))
    art = tmp_path / "note.txt"
    art.write_text("hello")
    with Tracker(good, "run-1", {"plca.alpha": 0.3}, {"variant": "plca"}) as tr:
        tr.log_metrics({"target/mIoU19": 42.0, "nan": float("nan")}, step=3)
        tr.log_artifact(art)
        run_id = tr.run_id
    mlflow.set_tracking_uri(good.uri)
    run = mlflow.get_run(run_id)
    assert run.data.params["plca.alpha"] == "0.3"
    assert run.data.metrics["target/mIoU19"] == 42.0 and "nan" not in run.data.metrics
    assert run.data.tags["variant"] == "plca"
    assert run.info.status == "FINISHED"
    assert (tmp_path / "a").is_dir()


def _source_target_batch(seed: int, target_mean: float, target_std: float) -> dict[str, torch.Tensor]:
    """Two 32x48 source images with 8x8-block labels and two target images drawn from another distribution."""
    rng = np.random.default_rng(seed)
    return {
        "source_image": torch.from_numpy(rng.normal(0, 1, (2, 3, 32, 48)).astype(np.float32)),
        "source_label": torch.from_numpy(np.kron(rng.integers(0, 19, (2, 4, 6)), np.ones((8, 8), np.int64))),
        "target_image": torch.from_numpy(rng.normal(target_mean, target_std, (2, 3, 32, 48)).astype(np.float32)),
    }


def test_control_without_target_loss_moves_only_batchnorm_statistics() -> None:
    """Table 1's control (PLCA with no target loss): the source gradients of source-only training, while the target
    pass, run without autograd, still moves BatchNorm's running statistics toward the target."""
    bn_model = DeepLabV2Config(num_classes=19, depth=18, width=0.125, norm="batch", aspp_rates=(1, 2))
    batch = _source_target_batch(0, 2.0, 3.0)
    runs, tracked = {}, {}
    for name, method_name, options in (("control", "plca", {"fass": False, "cass": False, "lsr": False}),
                                       ("plca", "plca", {}),
                                       ("source_only", "source_only", {"lovasz": True})):
        torch.manual_seed(0)
        model = build_model(bn_model).train()
        method = build_method(method_name, model, options)
        passes: list[bool] = []  # per forward pass: did autograd record it?
        hook = model.register_forward_hook(lambda _m, _i, out, passes=passes: passes.append(out[LOGITS].requires_grad))
        method.training_step(batch).loss.backward()
        hook.remove()
        runs[name], tracked[name] = model, passes
    # source pass then target pass; only PLCA's target losses need the target pass in the graph
    assert tracked == {"control": [True, False], "plca": [True, True], "source_only": [True]}
    control, source_only = runs["control"], runs["source_only"]
    for (name, a), b in zip(control.named_parameters(), source_only.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    stats_a, stats_b = control.backbone.bn1.running_mean, source_only.backbone.bn1.running_mean
    assert not torch.allclose(stats_a, stats_b)  # the target pass moved them


def test_minent_adds_the_weighted_target_entropy_to_source_only() -> None:
    """MinEnt (a baseline beside PLCA): source-only's objective plus w_ent x the normalised entropy of the target
    prediction at the input size; with w_ent = 0 it trains exactly like source-only."""
    cfg = DeepLabV2Config(num_classes=19, depth=18, width=0.125, aspp_rates=(1, 2))
    batch = _source_target_batch(1, 1.0, 2.0)
    outs, grads = {}, {}
    single = {"multi_level": False, "lovasz": True}  # the single-level MinEnt on source-only's CE + Lovasz
    for name, method_name, options in (("source_only", "source_only", {}), ("off", "minent", {**single, "w_ent": 0.0}),
                                       ("on", "minent", {**single, "w_ent": 0.5})):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        out = build_method(method_name, model, options).training_step(batch)
        out.loss.backward()
        outs[name], grads[name] = out, [p.grad.clone() for p in model.parameters()]
        if name == "on":
            lt = model(batch["target_image"])[LOGITS]
            expected_entropy = entropy_loss(upsample(lt, (32, 48))).item()
    for a, b in zip(grads["off"], grads["source_only"], strict=True):
        torch.testing.assert_close(a, b)
    assert outs["on"].terms["entropy_t"] == pytest.approx(expected_entropy, rel=1e-5)
    assert 0.0 < expected_entropy < 1.0
    assert outs["on"].loss.item() == pytest.approx(outs["source_only"].loss.item() + 0.5 * expected_entropy,
                                                   rel=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(grads["on"], grads["source_only"], strict=True))


# ------------------------------------------------------------------------------------------- each hook alone


def fake_trainer(**kw) -> SimpleNamespace:
    base = dict(step=0, total_steps=10, lrs={}, step_terms={}, hooks=[], device=torch.device("cpu"))
    return SimpleNamespace(**{**base, **kw})


def test_schedule_hook_sets_each_optimiser_from_its_own_schedule() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opts = {"model": torch.optim.SGD(a.parameters(), lr=0.1), "disc": torch.optim.Adam(b.parameters(), lr=1e-4)}
    confs = {"model": OptimConfig(lr=0.1, poly_power=1.0, warmup_steps=4), "disc": OptimConfig(lr=1e-4)}
    t = fake_trainer(optimizers=opts, optim_configs=confs, step=2)
    hook = ScheduleHook()
    hook.before_train(t)
    hook.before_step(t)
    # poly (power 1) x linear warmup by hand: (1 - 2/10) * (1 - (1 - 2/4)(1 - 1e-6)) = 0.8 * 0.5000005
    assert opts["model"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.8 * 0.5000005, rel=1e-12)
    assert opts["disc"].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.8**0.9, rel=1e-12)
    assert t.lrs == {"model": opts["model"].param_groups[0]["lr"], "disc": opts["disc"].param_groups[0]["lr"]}
    t.step = 9
    hook.before_step(t)  # from the initial lr, not compounded
    assert opts["model"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1, rel=1e-12)


def test_ema_hook_updates_each_teacher_before_or_after_the_step() -> None:
    torch.manual_seed(0)
    student, before, after = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    method = SimpleNamespace(teachers=lambda: {"before": EMASpec("student", 0.99),
                                               "after": EMASpec("student", 0.5, before_step=False)})
    t = fake_trainer(method=method, networks={"student": student, "before": before, "after": after}, step=0)
    hook = EMAHook()
    old_after = after.weight.detach().clone()
    hook.before_step(t)  # step 0: alpha 0, the teacher becomes the student; the "after" teacher waits
    assert torch.equal(before.weight, student.weight)
    assert torch.equal(after.weight, old_after)
    t.step = 5
    w_t, w_s = after.weight.detach().clone(), student.weight.detach().clone()
    hook.after_step(t)  # alpha = min(1 - 1/6, 0.5) = 0.5
    torch.testing.assert_close(after.weight, 0.5 * w_t + 0.5 * w_s)


def test_log_hook_rows_are_means_since_the_last_row() -> None:
    hook = LogHook(2)
    t = fake_trainer(total_steps=3, lrs={"model": 0.5, "disc": 0.1})
    for step, loss in enumerate([1.0, 3.0, 10.0]):
        t.step, t.step_terms = step, {"loss": loss, "ce": loss / 2}
        hook.after_step(t)
    assert hook.rows == [{"step": 2.0, "lr": 0.5, "lr/disc": 0.1, "loss": 2.0, "ce": 1.0},
                         {"step": 3.0, "lr": 0.5, "lr/disc": 0.1, "loss": 10.0, "ce": 5.0}]
    state = hook.state_dict()
    other = LogHook(2)
    other.load_state_dict(state)
    assert other.rows == hook.rows


def test_checkpoint_hook_saves_then_resumes_every_state(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    method = SimpleNamespace(state_dict=lambda: {"k": 7}, load_state_dict=lambda s: loaded.update(s))
    loaded: dict = {}
    log_hook = LogHook(1)
    log_hook.rows = [{"step": 1.0, "loss": 0.5}]
    hook = CheckpointHook(tmp_path / "c.pt", "fp", every=2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    t = fake_trainer(networks={"model": net}, optimizers={"model": opt}, scaler=scaler, method=method,
                     hooks=[log_hook, hook], step=0, total_steps=4)
    hook.after_step(t)  # 1 step done: not a multiple of 2
    assert not (tmp_path / "c.pt").exists()
    t.step = 1
    hook.after_step(t)
    assert ckpt.load(tmp_path / "c.pt")["step"] == 2

    net2 = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    log2 = LogHook(1)
    t2 = fake_trainer(networks={"model": net2}, optimizers={"model": opt2}, scaler=scaler, method=method,
                      hooks=[log2], start=0, step=0)
    CheckpointHook(tmp_path / "c.pt", "fp", every=2).before_train(t2)
    assert t2.start == t2.step == 2
    assert torch.equal(net2.weight, net.weight)
    assert torch.equal(opt2.state[net2.weight]["momentum_buffer"], opt.state[net.weight]["momentum_buffer"])
    assert log2.rows == log_hook.rows and loaded == {"k": 7}


def test_a_checkpoint_of_other_code_is_not_resumed_and_the_warning_says_why(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Resuming across a code change would end with weights neither version gives: the run starts over."""
    net, scaler = torch.nn.Linear(2, 2), torch.amp.GradScaler("cuda", enabled=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    method = SimpleNamespace(state_dict=dict, load_state_dict=lambda s: None)
    t = fake_trainer(networks={"model": net}, optimizers={"model": opt}, scaler=scaler, method=method, hooks=[],
                     step=1, total_steps=2)
    CheckpointHook(tmp_path / "c.pt", "fp", every=1, code="old").after_step(t)
    assert ckpt.load(tmp_path / "c.pt")["code"] == "old"
    t2 = fake_trainer(networks={"model": torch.nn.Linear(2, 2)}, optimizers={"model": opt}, scaler=scaler,
                      method=method, hooks=[], start=0, step=0)
    with caplog.at_level("WARNING"):
        CheckpointHook(tmp_path / "c.pt", "fp", every=1, code="new").before_train(t2)
    assert t2.start == 0 and "written by other code" in caplog.text
    CheckpointHook(tmp_path / "c.pt", "fp", every=1, code="old").before_train(t2)
    assert t2.start == 2


def test_the_source_digest_follows_every_source_file(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "t.yaml").write_text("k: 1\n")
    (pkg / "notes.txt").write_text("ignored")
    first = ckpt.source_digest(pkg)
    (pkg / "notes.txt").write_text("changed, still ignored")
    assert ckpt.source_digest(pkg) == first
    (pkg / "sub" / "t.yaml").write_text("k: 2\n")
    assert ckpt.source_digest(pkg) != first


def test_fit_is_the_loop_and_the_hooks_see_every_step(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []

    class Spy(Hook):
        def before_train(self, t: Trainer) -> None:
            calls.append(("before_train", t.step))

        def before_step(self, t: Trainer) -> None:
            calls.append(("before_step", t.step))

        def after_step(self, t: Trainer) -> None:
            calls.append(("after_step", t.step))

        def after_train(self, t: Trainer) -> None:
            calls.append(("after_train", t.step))

    _, method = make("source_only")
    Trainer(cfg(steps=2)).fit(method, streams(), [Spy()])
    assert calls == [("before_train", 0), ("before_step", 0), ("after_step", 0), ("before_step", 1),
                     ("after_step", 1), ("after_train", 1)]
    assert method.model.training


def _saved_twice(tmp_path: Path) -> tuple[Path, SimpleNamespace]:
    """A checkpoint hook that saved after steps 1 and 2 (every step): last.pt at 2, last.prev.pt at 1."""
    net, scaler = torch.nn.Linear(2, 2), torch.amp.GradScaler("cuda", enabled=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    method = SimpleNamespace(state_dict=dict, load_state_dict=lambda s: None)
    hook = CheckpointHook(tmp_path / "last.pt", "fp", every=1)
    for step in (0, 1):
        t = fake_trainer(networks={"model": net}, optimizers={"model": opt}, scaler=scaler, method=method,
                         hooks=[], step=step, total_steps=4)
        hook.after_step(t)
    fresh = fake_trainer(networks={"model": torch.nn.Linear(2, 2)}, optimizers={"model": opt}, scaler=scaler,
                         method=method, hooks=[], start=0, step=0)
    return tmp_path / "last.pt", fresh


@pytest.mark.parametrize("damage", ["bit_flip", "truncated", "no_checksum"])
def test_a_damaged_last_checkpoint_is_refused_and_the_one_before_resumes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    last, fresh = _saved_twice(tmp_path)
    assert ckpt.load_verified(last)["step"] == 2 and ckpt.load_verified(ckpt.previous(last))["step"] == 1
    data = bytearray(last.read_bytes())
    if damage == "bit_flip":  # one flipped bit: torch may well load it without a word
        data[-200] ^= 0x01
        last.write_bytes(bytes(data))
    elif damage == "truncated":
        last.write_bytes(bytes(data[: len(data) // 2]))
    else:  # killed between the checkpoint and its checksum
        last.with_name("last.pt.sha256").unlink()
    with pytest.raises(ckpt.CheckpointError, match="last.pt: "):
        ckpt.load_verified(last)
    with caplog.at_level("WARNING"):
        CheckpointHook(last, "fp", every=1).before_train(fresh)
    assert fresh.start == 1 and "trying the checkpoint before it" in caplog.text


def test_with_no_trustworthy_checkpoint_the_run_starts_afresh_and_says_so(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    last, fresh = _saved_twice(tmp_path)
    for path in (last, ckpt.previous(last)):
        path.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        CheckpointHook(last, "fp", every=1).before_train(fresh)
    assert fresh.start == 0 and "no usable checkpoint" in caplog.text
