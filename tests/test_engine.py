"""The training engine: deterministic streams, poly schedule, accumulation, checkpoint/resume, tracking failures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from plca.data.datasets import Sample
from plca.data.transforms import TransformConfig, train_transform
from plca.engine import checkpoint as ckpt
from plca.engine.optim import OptimConfig, poly_factor
from plca.engine.streams import KeyedDataset, StepBatchSampler
from plca.engine.tracking import Tracker, TrackingConfig
from plca.engine.trainer import EngineConfig, TrainConfig, Trainer, fingerprint
from plca.losses import entropy_loss
from plca.methods import build_method
from plca.methods.base import upsample
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


def test_poly_schedule_values() -> None:
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0
    assert poly_factor(150, 100, 0.9) == 0.0


def test_lr_follows_poly_and_losses_are_logged(tmp_path: Path) -> None:
    model, method = make("source_only", {"lovasz": True})
    res = Trainer(cfg(steps=4, optim=OptimConfig(lr=0.1, poly_horizon=8))).fit(
        method, streams(), checkpoint_path=tmp_path / "c.pt", run_fingerprint="x", log_csv=tmp_path / "log.csv",
        progress=False)
    lrs = [row["lr"] for row in res.log]
    assert lrs == pytest.approx([0.1 * poly_factor(s, 8, 0.9) for s in range(4)])
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].split(",") == ["step", "lr", "loss", "ce", "lovasz"]
    assert len(lines) == 5
    assert all(np.isfinite(row["loss"]) for row in res.log)


class Kill(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    # uninterrupted reference
    model_a, method_a = make()
    res_a = Trainer(cfg()).fit(method_a, streams(), checkpoint_path=tmp_path / "a.pt", run_fingerprint="f",
                               log_csv=tmp_path / "a.csv", progress=False)

    # the same run, killed after step 5 (its last checkpoint was written at step 4)
    model_b, method_b = make()

    def kill(step: int) -> None:
        if step == 5:
            raise Kill

    with pytest.raises(Kill):
        Trainer(cfg()).fit(method_b, streams(), checkpoint_path=tmp_path / "b.pt", run_fingerprint="f",
                           log_csv=tmp_path / "b.csv", callbacks=(kill,), progress=False)
    assert ckpt.load(tmp_path / "b.pt")["step"] == 4

    # a fresh process would rebuild everything: new model (other init), new method, same checkpoint
    torch.manual_seed(123)
    model_c, method_c = make()
    res_c = Trainer(cfg()).fit(method_c, streams(), checkpoint_path=tmp_path / "b.pt", run_fingerprint="f",
                               log_csv=tmp_path / "b.csv", progress=False)
    assert res_c.resumed_from == 4
    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values(), strict=True):
        assert torch.equal(pa, pc), name
    assert [r["loss"] for r in res_c.log] == [r["loss"] for r in res_a.log]
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "a.csv").read_text()


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path: Path, caplog) -> None:
    _, method = make("source_only")
    Trainer(cfg(steps=2)).fit(method, streams(), checkpoint_path=tmp_path / "c.pt", run_fingerprint="old",
                              progress=False, callbacks=())
    # steps=2 with checkpoint_every=2 never saves the final step; write one by hand
    ckpt.atomic_save({"fingerprint": "old", "step": 2}, tmp_path / "c.pt")
    _, method = make("source_only")
    res = Trainer(cfg(steps=2)).fit(method, streams(), checkpoint_path=tmp_path / "c.pt", run_fingerprint="new",
                                    progress=False)
    assert res.resumed_from == 0
    assert "another configuration" in caplog.text


def test_gradient_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    def grads(batch_size: int, accum: int) -> list[torch.Tensor]:
        model, method = make("source_only", {"lovasz": False})
        trainer = Trainer(cfg(steps=1, batch_size=batch_size, grad_accum=accum,
                              optim=OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.0)))
        before = [p.detach().clone() for p in model.parameters()]
        trainer.fit(method, streams(), checkpoint_path=tmp_path / f"{batch_size}.pt", run_fingerprint="g",
                    progress=False)
        return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]

    # blocky labels have no ignore pixels after a crop inside the image: CE means over equal pixel counts
    g4, g22 = grads(4, 1), grads(2, 2)
    for a, b in zip(g4, g22, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_method_without_its_stream_is_refused(tmp_path: Path) -> None:
    _, method = make("plca")
    with pytest.raises(ValueError, match="needs stream"):
        Trainer(cfg()).fit(method, {"source": streams()["source"]}, checkpoint_path=tmp_path / "c.pt",
                           run_fingerprint="x", progress=False)


def test_checkpoint_interval_must_fall_on_a_logged_step() -> None:
    with pytest.raises(ValueError, match="multiple of log_every"):
        Trainer(cfg(log_every=3, checkpoint_every=4))


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
            res = Trainer(cfg(steps=2)).fit(method, streams(), checkpoint_path=tmp_path / "c.pt",
                                            run_fingerprint="t", tracker=tracker, progress=False)
    assert res.steps == 2 and len(res.log) == 2
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


def test_optimizer_choice_and_head_lr() -> None:
    from plca.engine.optim import make_optimizer

    model = build_model(TINY_MODEL)
    sgd = make_optimizer(model, OptimConfig(lr=0.1, head_lr_mult=10.0))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["lr"] for g in sgd.param_groups] == [0.1, 1.0]
    n_params = sum(len(g["params"]) for g in sgd.param_groups)
    assert n_params == len(list(model.parameters()))
    adam = make_optimizer(model, OptimConfig(name="adam", lr=0.01))
    assert isinstance(adam, torch.optim.Adam)


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
        hook = model.register_forward_hook(lambda _m, _i, out, passes=passes: passes.append(out[1].requires_grad))
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
    for name, method_name, options in (("source_only", "source_only", {}), ("off", "minent", {"w_ent": 0.0}),
                                       ("on", "minent", {"w_ent": 0.5})):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        out = build_method(method_name, model, options).training_step(batch)
        out.loss.backward()
        outs[name], grads[name] = out, [p.grad.clone() for p in model.parameters()]
        if name == "on":
            _, lt = model(batch["target_image"])
            expected_entropy = entropy_loss(upsample(lt, (32, 48))).item()
    for a, b in zip(grads["off"], grads["source_only"], strict=True):
        torch.testing.assert_close(a, b)
    assert outs["on"].terms["entropy_t"] == pytest.approx(expected_entropy, rel=1e-5)
    assert 0.0 < expected_entropy < 1.0
    assert outs["on"].loss.item() == pytest.approx(outs["source_only"].loss.item() + 0.5 * expected_entropy,
                                                   rel=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(grads["on"], grads["source_only"], strict=True))
