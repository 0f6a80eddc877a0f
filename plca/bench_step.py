"""`python -m plca.bench step`: one PLCA training step at a profile's shapes, timed and taken apart.

The step is the pipeline's own (plca.methods.plca through plca.engine.trainer.Trainer.run_step: the same
autocast, gradient scaling and optimiser) on synthetic images and blocky labels, so it needs no data, DVC or
MLflow: torch and the package (whose class table comes from cityscapesscripts' `helpers.labels`, a file with no
dependencies). For each precision (fp32; TF32 on CUDA; bf16; bf16 with TF32 for the float32 parts, on CUDA) it
reports the time of a step, the peak GPU memory (CUDA), and the share of the step that each part takes when run
alone at the same shapes and precision: the network (forward and backward of both streams), the two associations
(Eq. 4 and 10, forward and backward on the network's outputs), Lovasz-softmax and the optimiser step. What is left
(CE, label smoothing, upsampling, the loop) is "other"; the parts overlap nothing, so they can exceed the step a
little on a noisy machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPORT = Path("reports/benchmarks.md")
STEP_HEADING = "## Training step"
IMPLS = ("auto", "blocked", "dense")


@dataclass(frozen=True)
class StepPreset:
    """The shapes of a profile's PLCA step (the values of profiles/<name>.yaml, written out so that the bench
    reads no params)."""

    model: dict
    crop: tuple[int, int]  # (h, w)
    batch_size: int  # per stream and forward pass
    grad_accum: int
    where: str


_PAPER = StepPreset(
    model=dict(depth=101, width=1.0, norm="batch", groups=32, aspp_rates=(6, 12, 18, 24)), crop=(730, 730),
    batch_size=4, grad_accum=2,
    where="profiles/gta5.yaml and synthia.yaml: DeepLab-v2 ResNet-101 (BatchNorm), 730x730 crops, 4 + 4 images a "
          "forward pass x 2 accumulated = 8 + 8 a step, as the released code over its two GPUs")
PRESETS: dict[str, StepPreset] = {
    "gta5": _PAPER,
    "synthia": _PAPER,  # the same network and crops: 19 train ids, SYNTHIA labels a subset of them
    "toy": StepPreset(
        model=dict(depth=18, width=0.25, norm="group", groups=8, aspp_rates=(1, 2, 3, 4)), crop=(64, 128),
        batch_size=4, grad_accum=1, where="profiles/default.yaml: the embedded pair's toy network and crops"),
}
#: Each measured precision as the engine's (`engine.precision`, `engine.tf32`). bf16 autocasts the network and keeps
#: the associations in float32 (TF32 off); bf16+tf32 lets those float32 matrix products use TF32 too.
PRECISIONS: dict[str, tuple[str, bool]] = {
    "fp32": ("fp32", False), "tf32": ("fp32", True), "bf16": ("bf16", False), "bf16+tf32": ("bf16", True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], repeats: int, device: torch.device, cpu: list[float] | None = None) -> float:
    """Mean seconds of `fn` over `repeats` runs (after the caller's warm-up); the mean CPU-seconds of this process
    (every thread, spinning ones included) appended to `cpu` when given."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / max(repeats, 1))
    return (time.perf_counter() - t0) / max(repeats, 1)


def profile_ops(fn: Callable[[], None], steps: int, top: int) -> list[tuple[str, float, float]]:
    """(op, self CPU-seconds a step, share of all ops' self time) of the `top` torch ops in `steps` runs of `fn`
    under torch.profiler: where a step's time goes, op by op. Work outside torch's ops shows only where a
    `record_function` names it (the Lovasz sort: `plca::lovasz_sort`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e6 / steps, e.self_cpu_time_total / total) for e in events[:top]]


def synthetic_batch(preset: StepPreset, num_classes: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Normalised random images and labels of 8x8 random-class cells (one cell in 9 unlabelled)."""
    g = torch.Generator().manual_seed(seed)
    (h, w), b = preset.crop, preset.batch_size
    cells = torch.randint(0, num_classes, (b, 8, 8), generator=g)
    cells[torch.rand(b, 8, 8, generator=g) < 1 / 9] = 255
    labels = torch.nn.functional.interpolate(cells[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    return {"source_image": torch.randn(b, 3, h, w, generator=g).to(device), "source_label": labels.to(device),
            "target_image": torch.randn(b, 3, h, w, generator=g).to(device)}


def measure(preset: StepPreset, precision: str, device: torch.device, steps: int, warmup: int,
            seed: int = 0, impl: str = "auto", profile: int = 0) -> dict:
    """Seconds a step (wall and CPU; each part alone: wall) and the peak memory of one precision and association
    kernel (PLCA's `impl` option); with `profile` > 0, the top ops of that many more steps ("ops")."""
    from plca.engine.contract import TrainContext
    from plca.engine.optim import OptimConfig
    from plca.engine.trainer import EngineConfig, TrainConfig, Trainer
    from plca.losses import associate, downsample_labels, lovasz_softmax
    from plca.methods import build_method
    from plca.methods.plca import PLCA
    from plca.models.deeplabv2 import DeepLabV2Config, build_model
    from plca.models.output import FEATURES, LOGITS, forward_pair

    torch.manual_seed(seed)
    model = build_model(DeepLabV2Config(num_classes=19, **preset.model))
    method = build_method(PLCA.name, model, {"impl": impl})
    engine = EngineConfig(batch_size=preset.batch_size, grad_accum=preset.grad_accum, device=str(device),
                          precision=PRECISIONS[precision][0], tf32=PRECISIONS[precision][1])
    trainer = Trainer(TrainConfig(steps=warmup + steps, seed=seed, optim=OptimConfig(lr=2.5e-4), engine=engine))
    trainer._setup(method, [])  # the loop's own setup: device, optimisers, scaler
    batch = synthetic_batch(preset, 19, device, seed)

    def same() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield batch

    batches = same()

    def step() -> None:
        trainer.run_step(batches)
        trainer.step += 1

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu: list[float] = []
    out: dict = {"step": _timed(step, steps, device, cpu)}
    out["step_cpu"] = cpu[0]
    out["peak_bytes"] = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")
    if profile:
        out["ops"] = profile_ops(step, profile, top=12)
    method.before_step(TrainContext(device, trainer.step, trainer.total_steps))
    autocast = torch.autocast(device.type, dtype=trainer.autocast_dtype or torch.float32,
                              enabled=trainer.autocast_dtype is not None)
    accum = preset.grad_accum

    def network() -> None:
        for _ in range(accum):
            with autocast:  # as the method passes the two streams (one stacked pass when per-sample)
                o_s, o_t = forward_pair(model, batch["source_image"], batch["target_image"])
                loss = o_s[LOGITS].float().mean() + o_t[LOGITS].float().mean()
            loss.backward()

    with torch.no_grad(), autocast:
        o_s, o_t = model(batch["source_image"]), model(batch["target_image"])
    fs, ft = o_s[FEATURES].float(), o_t[FEATURES].float()
    ls, lt = o_s[LOGITS].float(), o_t[LOGITS].float()
    grid = downsample_labels(batch["source_label"], tuple(fs.shape[-2:]))

    def association() -> None:
        for _ in range(accum):
            a = [x.detach().requires_grad_() for x in (fs, ft, ls, lt)]
            fass = associate(a[0], a[1], grid, similarity="cosine", impl=impl).loss
            cass = associate(a[2].softmax(1), a[3].softmax(1), grid, similarity="kl", impl=impl).loss
            (fass + cass).backward()

    def lovasz() -> None:
        for _ in range(accum):
            up = model.upsample(ls.detach().requires_grad_(), tuple(batch["source_label"].shape[-2:]))
            lovasz_softmax(up.softmax(1), batch["source_label"]).backward()

    def optimiser() -> None:
        for opt in trainer.optimizers.values():
            opt.step()

    for name, fn in (("network", network), ("association", association), ("lovasz", lovasz),
                     ("optimiser", optimiser)):
        fn()  # warm-up of the part alone
        out[name] = _timed(fn, max(1, min(steps, 3)), device)
        model.zero_grad(set_to_none=False)
    return out


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s >= 0.1 else f"{s * 1000:.1f} ms"


def run_step_bench(args: argparse.Namespace) -> str:
    from plca.bench import device_description
    from plca.losses.association import DENSE_MAX_ENTRIES, DENSE_MAX_ENTRIES_CUDA

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    if args.crop:
        preset = replace(preset, crop=tuple(args.crop))
    if args.batch:
        preset = replace(preset, batch_size=args.batch)
    if args.grad_accum:
        preset = replace(preset, grad_accum=args.grad_accum)
    rows, skipped, profiled = [], [], []
    for impl in args.impls:
        for precision in args.precisions:
            if PRECISIONS[precision][1] and device.type != "cuda":
                skipped.append(f"{precision} (CUDA only)")
                continue
            r = measure(preset, precision, device, args.steps, args.warmup, args.seed, impl,
                        profile=args.profile if not profiled else 0)
            if "ops" in r:
                profiled = [f"Where a step's time goes, op by op (torch.profiler, {args.profile} more steps of "
                            f"{precision if args.impls == ['auto'] else f'{precision}, {impl}'}; self time of "
                            "each op, children excluded):", "",
                            "| op | self time a step | share |", "|---|---:|---:|",
                            *(f"| `{name}` | {_ms(sec)} | {share:.1%} |" for name, sec, share in r["ops"])]
            parts = ("network", "association", "lovasz", "optimiser")
            shares = [r[p] / r["step"] for p in parts]
            peak = "n/a (CPU)" if device.type != "cuda" else f"{r['peak_bytes'] / 2**30:.1f} GiB"
            label = precision if args.impls == ["auto"] else f"{precision}, {impl}"
            rows.append(f"| {label} | {_ms(r['step'])} | {_ms(r['step_cpu'])} | {peak} | "
                        + " | ".join(f"{s:.0%}" for s in shares) + f" | {max(0.0, 1 - sum(shares)):.0%} |")
            print(f"  {label}: {r['step']:.3f} s a step", flush=True)
    h, w = preset.crop
    command = "python -m plca.bench step " + " ".join(args.argv)
    return "\n".join([
        "One PLCA training step as the pipeline runs it (`plca.methods.plca` through the engine's `run_step`), on "
        "synthetic inputs at a profile's shapes, and the share of the step each part takes when run alone "
        "(`plca/bench_step.py`).",
        "",
        f"- Command: `{command}`, {_dt.date.today().isoformat()}",
        f"- Device: {device_description(args.device)}; torch {torch.__version__}"
        + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""),
        f"- Shapes ({args.preset}): {preset.where}; run here at {h}x{w}, {preset.batch_size} + "
        f"{preset.batch_size} images a pass x {preset.grad_accum}.",
        f"- Time: mean of {args.steps} steps after {args.warmup} warm-up steps, wall and CPU (this process's "
        "CPU-seconds, every thread, spin-waiting included); parts: wall, mean of up to 3 runs each after one "
        "warm-up. Peak memory: torch.cuda.max_memory_allocated over the timed steps."
        + (f" Not run: {', '.join(sorted(set(skipped)))}." if skipped else ""),
        "- Association kernels (PLCA's `impl`): " + ", ".join(args.impls) + " (auto: batched dense up to "
        f"{DENSE_MAX_ENTRIES:.1e} similarity entries a batch on the CPU, {DENSE_MAX_ENTRIES_CUDA:.1e} on a GPU, "
        "block-wise above; the paper's 4 pairs of 92x92 grids: 2.9e+08).",
        "- Several processes: not measured (this bench runs one; training on several: docs/gpu.md#several-gpus)."
        + ("" if device.type == "cuda" else " The paper's shapes on a GPU: `tools/gpu_bench.sh` runs them on a "
                                               "GPU, into the section \"Training step on a GPU\"."),
        "",
        "| precision | step | step, CPU | peak memory | network | association | Lovasz | optimiser | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        *([""] + profiled if profiled else []),
    ])


def add_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="gta5", help="a profile's shapes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=["auto"],
                   help="PLCA's association kernels (its `impl` option), each measured at every precision")
    p.add_argument("--steps", type=int, default=10, help="timed steps per precision")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN, allocator)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="override the preset's crop")
    p.add_argument("--batch", type=int, help="override the images per stream and pass")
    p.add_argument("--grad-accum", type=int, help="override the passes accumulated per step")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N more steps of the first row (torch.profiler) and list its top ops")
    p.add_argument("--output", type=Path, default=REPORT)
    p.add_argument("--no-write", action="store_true", help="print only")


def step_command(args: argparse.Namespace) -> None:
    from plca.bench import device_heading, replace_section

    if args.steps < 1 or args.warmup < 0 or args.profile < 0:
        raise SystemExit(f"--steps must be >= 1, --warmup and --profile >= 0, got {args.steps}, {args.warmup} and "
                         f"{args.profile}")
    body = run_step_bench(args)
    heading = device_heading(STEP_HEADING, args.device)
    print(f"{heading}\n\n{body}")
    if not args.no_write:
        replace_section(args.output, heading, body)
        print(f"wrote section '{heading}' of {args.output}")
