"""`python -m plca.bench SUBCOMMAND ...`: measured figures for reports/benchmarks.md.

Each subcommand prints its table and replaces its own section of the report (a `## ` heading and everything
up to the next one), leaving the other sections alone. Subcommands are registered in `SUBCOMMANDS`.

`step`: one PLCA training step at a profile's shapes (`plca/bench_step.py`).

`association`: one forward+backward of the association loss for one image pair, the block-wise
implementation (`plca.losses.association_loss`) against the plain dense one
(`plca/losses/dense.py`). Every (input, size, implementation) is timed in a fresh process and its
peak memory taken in another one: on CUDA torch.cuda.max_memory_allocated above what the inputs hold; on CPU
the process's resident-set high-water mark (VmHWM, reset once the inputs exist) above the resident set at that
moment, with glibc told to return every freed block of 64 KiB or more to the system so that the resident set
follows what is allocated (not done in timed runs, where it would add page faults).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from plca.bench_step import add_step_args, step_command
from plca.data.labels import IGNORE_INDEX
from plca.io import atomic_write_text

REPORT = Path("reports/benchmarks.md")
ASSOCIATION_HEADING = "## Association loss"
#: Coarse grid of the synthetic label layouts: 6 x 6 cells of one class each, two of them unlabelled.
LAYOUT_CELLS = 6
IGNORED_CELLS = 2
#: Synthetic features: class embedding + FEATURE_NOISE * N(0, 1), then ReLU (like a backbone's last layer).
FEATURE_NOISE = 1.5
#: Synthetic predictions: softmax(PREDICTION_MARGIN * onehot(class) + N(0, 1)).
PREDICTION_MARGIN = 3.0
#: glibc: serve (and return) allocations from this size up with mmap, so RSS tracks live tensors.
MMAP_THRESHOLD = 65536
WORKER = "_association-worker"


# ---- report sections -----------------------------------------------------------------------------------------


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `heading` + `body` in place of that section of the markdown file (appended if absent), atomically."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    section = [heading, "", *body.strip("\n").splitlines()]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = lines[end:]
        lines = lines[:start] + section + ([""] + tail if tail else [])
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines = [*lines, "", *section]
    atomic_write_text(path, "\n".join(lines) + "\n")


def device_heading(heading: str, device: str) -> str:
    """The report section of a benchmark on `device`: a GPU's figures go to their own section, so that the CPU's
    and the GPU's both stay."""
    return heading + (" on a GPU" if device == "cuda" else "")


def device_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical CPUs"


# ---- association: inputs and one measured run ---------------------------------------------------------------


@dataclass
class AssociationCase:
    """One configuration: features (cosine) or predictions (kl) on a side x side grid."""

    kind: str
    side: int
    channels: int
    num_classes: int
    seed: int
    device: str
    repeats: int
    threads: int | None
    #: "recompute" / "cached": block-wise with cache_similarities False / True; "dense": the dense reference
    implementation: str
    #: "time": `repeats` timed runs, loss and gradients saved; "memory": one run under the peak-memory probe.
    mode: str = "time"
    #: NCHW-contiguous inputs, as a network's features; else as drawn (features channels-last, predictions NCHW).
    contiguous: bool = False

    @property
    def similarity(self) -> str:
        return "cosine" if self.kind == "features" else "kl"


def make_inputs(case: AssociationCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic scenes: blocky label layouts, class-dependent features or predictions; deterministic."""
    g = torch.Generator().manual_seed(case.seed)
    n_cls = case.num_classes

    def layout() -> torch.Tensor:
        cells = torch.randint(0, n_cls, (LAYOUT_CELLS * LAYOUT_CELLS,), generator=g)
        cells[torch.randperm(cells.numel(), generator=g)[:IGNORED_CELLS]] = IGNORE_INDEX
        grid = cells.reshape(1, 1, LAYOUT_CELLS, LAYOUT_CELLS).float()
        return F.interpolate(grid, size=(case.side, case.side), mode="nearest").long()[:, 0]

    ys, yt = layout(), layout()
    if case.kind == "features":
        embedding = torch.randn(n_cls + 1, case.channels, generator=g)  # row n_cls: unlabelled stuff

        def draw(y: torch.Tensor) -> torch.Tensor:
            rows = embedding[torch.where(y == IGNORE_INDEX, n_cls, y)].permute(0, 3, 1, 2)
            return (rows + FEATURE_NOISE * torch.randn(rows.shape, generator=g)).relu()
    else:

        def draw(y: torch.Tensor) -> torch.Tensor:
            onehot = F.one_hot(torch.where(y == IGNORE_INDEX, 0, y), n_cls).permute(0, 3, 1, 2).float()
            return (PREDICTION_MARGIN * onehot + torch.randn(onehot.shape, generator=g)).softmax(1)

    source, target = draw(ys), draw(yt)
    if case.contiguous:  # a pixel's channels strided, as in a network's [N, C, h, w] output
        source, target = source.contiguous(), target.contiguous()
    return source.to(case.device), target.to(case.device), ys.to(case.device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_cpu_peak() -> tuple[int, str]:
    """Reset the high-water mark; returns (bytes resident now, method name)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024, "VmHWM"
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _cpu_peak(method: str) -> int:
    if method == "VmHWM":
        return _status_kib("VmHWM") * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(case: AssociationCase, out_dir: Path) -> dict:
    """One implementation on one case, in this process: timed runs (saving loss and gradients) or one run
    measuring peak memory."""
    from plca.losses import associate
    from plca.losses.dense import dense_association_loss

    if case.threads is not None:
        torch.set_num_threads(case.threads)
    source, target, labels = make_inputs(case)
    source.requires_grad_()
    target.requires_grad_()
    cuda = case.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    record: dict = {"torch_threads": torch.get_num_threads()}
    sync()
    if case.mode == "memory":
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base, method = torch.cuda.memory_allocated(), "max_memory_allocated"
        else:
            base, method = _reset_cpu_peak()
    seconds = []
    for _ in range(case.repeats if case.mode == "time" else 1):
        source.grad = target.grad = None
        sync()
        start = time.perf_counter()
        if case.implementation in ("recompute", "cached"):
            result = associate(source, target, labels, similarity=case.similarity,
                               cache_similarities=case.implementation == "cached")
            loss = result.loss
            record["positive_rate"] = result.positive_rate
            record["distinct_targets"] = int(torch.unique(result.target_index[result.positive]).numel())
        else:
            loss = dense_association_loss(source, target, labels, similarity=case.similarity)
        loss.backward()
        sync()
        seconds.append(time.perf_counter() - start)
    if case.mode == "memory":
        record["peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda else _cpu_peak(method)) - base
        record["memory_method"] = method
    else:
        record["seconds"] = seconds
        torch.save({"loss": loss.detach().cpu(), "source": source.grad.cpu(), "target": target.grad.cpu()},
                   out_dir / f"{case.implementation}.pt")
    return record


def _spawn(case: AssociationCase, out_dir: Path) -> dict:
    env = dict(os.environ)
    if case.mode == "memory":  # timing runs keep the normal allocator: mmap'ing every block would cost page faults
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "plca.bench", WORKER, json.dumps(asdict(case)), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {case.implementation} {case.kind} {case.side}x{case.side}:"
                           f"\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- association: the table ---------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _secs(s: float) -> str:
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def run_association(args: argparse.Namespace) -> str:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    rows, notes = [], []
    channels_of = {"features": args.feature_channels, "predictions": args.classes}
    kinds = [(kind, channels_of[kind]) for kind in args.kinds]
    for side in args.sizes:
        for kind, channels in kinds:
            # caching only changes the cosine path
            variants = ("cached", "recompute") if kind == "features" else ("recompute",)
            implementations = (*variants, "dense")
            measured: dict[str, dict] = {impl: {"seconds": []} for impl in implementations}
            with tempfile.TemporaryDirectory(prefix="plca-bench-") as tmp:
                # interleaved rounds, one run per process: a busy spell on a shared machine hits all alike
                for round_index in range(args.repeats):
                    for impl in implementations:
                        case = AssociationCase(kind, side, channels, args.classes, args.seed, args.device, 1,
                                               args.threads, impl, contiguous=args.contiguous)
                        record = _spawn(case, Path(tmp) / str(round_index))
                        measured[impl]["seconds"] += record.pop("seconds")
                        measured[impl].update(record)
                for impl in implementations:
                    measured[impl].update(_spawn(replace(case, implementation=impl, mode="memory"), Path(tmp)))
                    print(f"  {kind} {side}x{side} {impl}: best {min(measured[impl]['seconds']):.3f} s of "
                          f"{len(measured[impl]['seconds'])}, peak {_mib(measured[impl]['peak_bytes'])}",
                          file=sys.stderr, flush=True)
                saved = {impl: torch.load(Path(tmp) / "0" / f"{impl}.pt") for impl in implementations}
            dense = saved["dense"]
            t_dense, m_dense = min(measured["dense"]["seconds"]), measured["dense"]["peak_bytes"]
            g_max = max(dense[k].abs().max().item() for k in ("source", "target"))
            for impl in variants:
                ours = saved[impl]
                d_loss = (ours["loss"] - dense["loss"]).abs().item()
                d_grad = max((ours[k] - dense[k]).abs().max().item() for k in ("source", "target"))
                t_ours, m_ours = min(measured[impl]["seconds"]), measured[impl]["peak_bytes"]
                mode = {"cached": ", cached (default)", "recompute": ", recompute"}[impl] if kind == "features" else ""
                label = f"{kind}: {channels} ch, {'cosine' if kind == 'features' else 'KL'}{mode}"
                cycles = measured[impl]
                rows.append(
                    f"| {label} | {side}x{side} = {side * side} | {_secs(t_ours)} | {_secs(t_dense)} | "
                    f"**{t_ours / t_dense:.2f}** | {_mib(m_ours)} | {_mib(m_dense)} | **{m_ours / m_dense:.2f}** | "
                    f"{cycles['positive_rate']:.2f} / {cycles['distinct_targets'] / side**2:.2f} | "
                    f"{float(ours['loss']):.4f} | {d_loss:.1e} | {d_grad:.1e} ({d_grad / g_max:.1e} of max) |"
                )
                notes.append((f"{kind}{mode}", side, t_ours / t_dense, m_ours / m_dense))
    method = measured["dense"]["memory_method"]
    threads = measured["dense"]["torch_threads"]
    met = [f"{k} {s}x{s}" for k, s, t, m in notes if t <= 0.7 and m <= 0.5]
    missed = [f"{k} {s}x{s} (time {t:.2f}, memory {m:.2f})" for k, s, t, m in notes if not (t <= 0.7 and m <= 0.5)]
    command = "python -m plca.bench association " + " ".join(args.argv)
    memory_note = ("torch.cuda.max_memory_allocated above the inputs" if args.device == "cuda" else
                   f"resident-set high-water mark ({method}) above the resident set once the inputs exist, "
                   f"glibc returning freed blocks >= {MMAP_THRESHOLD // 1024} KiB")
    body = "\n".join([
        "One forward+backward of the association loss (target aggregation on) for one image pair: the block-wise "
        "`plca.losses.association_loss` against the plain dense implementation of the same formulas "
        "(`plca/losses/dense.py`), each configuration in a fresh process. Block-wise modes (cosine "
        "only; predictions always recompute): *cached* (default, `cache_similarities=True`) keeps the SAGG "
        "similarities (upper half) and D_st from forward to backward; *recompute* keeps no L x L matrix and "
        "recomputes blocks in backward.",
        "",
        f"- Command: `{command}`, {_dt.date.today().isoformat()}",
        f"- Device: {device_description(args.device)}; torch {torch.__version__}"
        + (f", {threads} thread(s)" if args.device == "cpu" else ""),
        f"- Time: best of {args.repeats} runs, each in its own process, the implementations taking turns. Peak "
        f"memory, in one more process per implementation: {memory_note}; both include the input gradients.",
        f"- Inputs (seed {args.seed}): labels on a {LAYOUT_CELLS}x{LAYOUT_CELLS} grid of random classes "
        f"({IGNORED_CELLS} cells unlabelled); features = class embedding + {FEATURE_NOISE} N(0,1), ReLU; "
        f"predictions = softmax({PREDICTION_MARGIN} onehot + N(0,1)); "
        + ("NCHW-contiguous, as a network's outputs (a pixel's channels strided)" if args.contiguous else
           "features channels-last (a pixel's channels contiguous), predictions NCHW-contiguous, as drawn")
        + ". Positives: share of labelled source pixels with a label-consistent cycle / distinct target pixels they "
        "land on, per pixel.",
        "- Difference: max abs difference of the loss and of the input gradients, block-wise vs dense (float32).",
        "",
        "| input | grid (L) | time block-wise | time dense | time ratio | peak block-wise | peak dense | "
        "memory ratio | positives / targets | loss | max abs diff loss | max abs diff grad |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Targets (issue 3): time ratio <= 0.7 and memory ratio <= 0.5. "
        + (f"Met: {', '.join(met)}. " if met else "")
        + (f"Not met: {'; '.join(missed)}." if missed else "All met."),
    ])
    return body


def add_association_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[92, 64], help="grid sides (L = side^2)")
    p.add_argument("--kinds", nargs="+", choices=["features", "predictions"], default=["features", "predictions"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--feature-channels", type=int, default=2048)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contiguous", action="store_true",
                   help="NCHW-contiguous inputs, as a network's features (default: features channels-last)")
    p.add_argument("--output", type=Path, default=REPORT)
    p.add_argument("--no-write", action="store_true", help="print only")


def association_command(args: argparse.Namespace) -> None:
    body = run_association(args)
    heading = device_heading(ASSOCIATION_HEADING, args.device)
    print(f"{heading}\n\n{body}")
    if not args.no_write:
        replace_section(args.output, heading, body)
        print(f"wrote section '{heading}' of {args.output}", file=sys.stderr)


#: name -> (help, add arguments, run)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "association": ("association loss: block-wise vs dense, time and peak memory", add_association_args,
                    association_command),
    "step": ("a PLCA training step at a profile's shapes: time, peak memory, the share of each part",
             add_step_args, step_command),
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER]:  # internal: one measured run in a fresh process
        case = AssociationCase(**json.loads(argv[1]))
        print(json.dumps(run_worker(case, Path(argv[2]))))
        return
    parser = argparse.ArgumentParser(prog="python -m plca.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    SUBCOMMANDS[args.command][2](args)


if __name__ == "__main__":
    main()
