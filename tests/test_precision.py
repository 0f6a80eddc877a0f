"""The engine's precision and GPU switches: validated at load, out of the fingerprint at their defaults, and a
bfloat16 step close to the float32 one (checked on CPU, where bfloat16 autocast runs too)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from test_engine import cfg, fit, make, streams

from plca.config import to_dict
from plca.engine.trainer import EngineConfig, Trainer


def test_a_wrong_precision_is_named() -> None:
    with pytest.raises(ValueError, match="precision must be one of .*'fp8'"):
        EngineConfig(precision="fp8")
    with pytest.raises(ValueError, match="amp .* bf16 contradict"):
        EngineConfig(amp=True, precision="bf16")


def test_the_switches_at_their_defaults_leave_the_fingerprint_as_it_was() -> None:
    """Runs trained before the switches existed keep their fingerprints (and model files, which record it)."""
    e = EngineConfig()
    old_keys = {"batch_size", "grad_accum", "device", "amp", "num_workers", "log_every", "checkpoint_every",
                "threads"}
    assert e.fingerprint_dict() == {k: v for k, v in to_dict(e).items() if k in old_keys}
    bf16 = replace(e, precision="bf16", channels_last=True)
    assert bf16.fingerprint_dict()["precision"] == "bf16" and bf16.fingerprint_dict()["channels_last"] is True
    assert len(fields(e)) == len(old_keys) + 8  # precision, tf32, channels_last, cudnn_benchmark, compile,
    # processes, sync_batchnorm, normalise


def test_autocast_dtype_of_each_setting() -> None:
    assert EngineConfig().autocast_dtype is None
    assert EngineConfig(precision="bf16").autocast_dtype == torch.bfloat16
    assert EngineConfig(amp=True).autocast_dtype == EngineConfig(precision="fp16").autocast_dtype == torch.float16
    # float16 needs CUDA: on the CPU the trainer falls back to float32 and needs no scaler
    cpu = Trainer(cfg(precision="fp16"))
    assert cpu.autocast_dtype is None and not cpu.amp
    assert Trainer(cfg(precision="bf16")).autocast_dtype == torch.bfloat16


def _first_step_terms(precision: str, method: str, channels_last: bool = False) -> dict[str, float]:
    _, m = make(method)
    trainer = Trainer(cfg(steps=1, precision=precision, channels_last=channels_last))
    trainer.fit(m, streams(), [])
    return trainer.step_terms


@pytest.mark.parametrize("method", ["source_only", "plca"])
def test_a_bf16_step_is_close_to_the_float32_step(method: str) -> None:
    """The first step's loss and each term (same weights, same batch) under bfloat16 autocast: within 1% of
    float32, measured at most 8e-4 (bfloat16 keeps 8 bits of mantissa; the association computes in float32)."""
    fp32 = _first_step_terms("fp32", method)
    bf16 = _first_step_terms("bf16", method)
    assert fp32.keys() == bf16.keys() and len(fp32) > 1
    for key, value in fp32.items():
        assert bf16[key] == pytest.approx(value, rel=1e-2, abs=1e-3), key
    assert any(bf16[k] != fp32[k] for k in fp32)  # bfloat16 did run


def test_channels_last_trains_to_the_same_weights(tmp_path: Path) -> None:
    """A memory layout, not a change of arithmetic: the same weights as the contiguous layout, to float tolerance."""
    model_a, a = make("source_only")
    fit(tmp_path, "a", a, cfg(steps=2, channels_last=False), log_csv=False)
    model_b, b = make("source_only")
    fit(tmp_path, "b", b, cfg(steps=2, channels_last=True), log_csv=False)
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
