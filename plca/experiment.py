"""One run of the pipeline from typed params: build data, model and method; train; evaluate; write outputs.

The stage scripts call these functions; they know params and paths, the engine and the methods do not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from plca.config import flatten, to_dict
from plca.data.datasets import CityscapesReader, GTA5Reader, SynthiaReader
from plca.data.transforms import train_transform
from plca.engine import checkpoint as ckpt
from plca.engine.hooks import default_hooks
from plca.engine.streams import KeyedDataset
from plca.engine.tracking import Tracker, TrackingConfig
from plca.engine.trainer import STREAM_IDS, TrainConfig, Trainer, fingerprint, resolve_device
from plca.evaluation.cycles import CycleConfig, cycle_diagnostics
from plca.evaluation.inference import InferenceConfig, evaluate
from plca.evaluation.metrics import summarize
from plca.io import atomic_write_json, atomic_write_png
from plca.methods import build_method
from plca.models.deeplabv2 import DeepLabV2, DeepLabV2Config, build_model
from plca.params import DomainConfig, Params, PhaseConfig

log = logging.getLogger(__name__)

PRETRAIN = "pretrain"


def make_reader(domain: DomainConfig, split: str, with_labels: bool = True) -> Any:
    """A reader of one split ("train" | "val") of a domain, in its own on-disk format."""
    which = domain.train if split == "train" else domain.val
    # train None on GTA5/SYNTHIA = every item (they have no official splits; the paper trains on all of them)
    if which is None and (split != "train" or domain.format == "cityscapes"):
        raise ValueError(f"{domain.root}: no '{split}' split configured")
    ids = None if which is None else domain.root / which
    if domain.format == "cityscapes":
        return CityscapesReader(domain.root, which, with_labels=with_labels)
    if domain.format == "gta5":
        return GTA5Reader(domain.root, ids=ids)
    return SynthiaReader(domain.root, ids=ids)


def save_model(model: DeepLabV2, path: Path, meta: dict[str, Any]) -> None:
    ckpt.atomic_save({"model_config": to_dict(model.cfg), "state_dict": model.state_dict(), "meta": meta}, path)


def load_model(path: Path, device: torch.device | str = "cpu") -> DeepLabV2:
    """A model saved by `save_model` (architecture from the file, no ImageNet weights needed)."""
    state = ckpt.load(path, map_location=device)
    cfg = DeepLabV2Config(**{**state["model_config"], "pretrained": None})
    model = DeepLabV2(cfg)
    model.load_state_dict(state["state_dict"])
    return model.to(device)


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class RunSpec:
    """What to train: a Table 1 variant (or the pretraining) for one seed."""

    name: str
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.name}-s{self.seed}"


def _phase_and_method(params: Params, name: str) -> tuple[PhaseConfig, str, dict[str, Any], str, bool]:
    """(phase, method, options, labelled stream source, start from pretrain?) of a run."""
    if name == PRETRAIN:
        p = params.pretrain
        return p, p.method, params.pretrain_options(), "source", False
    v = params.variant(name).train
    phase = params.oracle if name == params.runs.oracle else params.adapt
    return phase, v.method, params.method_options(name), v.labelled, v.init == "pretrain"


def train_run(
    params: Params,
    spec: RunSpec,
    *,
    out_dir: Path,
    log_csv: Path,
    checkpoint_dir: Path,
    init_model: Path | None,
    tracking: TrackingConfig,
    tags: dict[str, str],
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run and write `out_dir/model.pt`; resumes from `checkpoint_dir/last.pt` after a crash (and returns
    at once when that checkpoint is of the finished run). The caller removes the checkpoint when it has served."""
    phase, method_name, options, labelled, from_pretrain = _phase_and_method(params, spec.name)
    if params.engine.threads:
        torch.set_num_threads(params.engine.threads)
    torch.manual_seed(spec.seed)
    model = build_model(params.model)
    init_digest = None
    if from_pretrain:
        if init_model is None:
            raise ValueError(f"{spec.run_name}: starts from the pretrained model, but none was given")
        model.load_state_dict(load_model(init_model).state_dict())
        init_digest = file_digest(init_model)
    method = build_method(method_name, model, options, where=f"params.variants.{spec.name}.options")

    labelled_domain = params.data.source if labelled == "source" else params.data.target
    streams = {
        "source": KeyedDataset(make_reader(labelled_domain, "train", with_labels=True),
                               lambda s, rng: train_transform(s, params.data.train_transform, rng),
                               spec.seed, STREAM_IDS["source"]),
    }
    if "target" in method.streams:
        streams["target"] = KeyedDataset(make_reader(params.data.target, "train", with_labels=False),
                                         lambda s, rng: train_transform(s, params.data.train_transform, rng),
                                         spec.seed, STREAM_IDS["target"])
    tcfg = TrainConfig(steps=phase.steps, seed=spec.seed, optim=phase.optim, engine=params.engine)
    run_params = {
        "run": spec.name, "seed": spec.seed, "method": method_name, "labelled": labelled,
        "options": options, "phase": to_dict(phase), "engine": to_dict(params.engine), "model": to_dict(params.model),
        "data": to_dict(params.data), "init_model": init_digest,
    }
    run_fp = fingerprint(run_params)
    trainer = Trainer(tcfg)
    with Tracker(tracking, spec.run_name, flatten(run_params), tags) as tracker:
        e = params.engine
        hooks = default_hooks(steps_name=method.name, log_every=e.log_every, checkpoint_every=e.checkpoint_every,
                              checkpoint_path=checkpoint_dir / "last.pt", fingerprint=run_fp, log_csv=log_csv,
                              tracker=tracker, progress=progress)
        result = trainer.fit(method, streams, hooks)
        save_model(model, out_dir / "model.pt", {"run": spec.run_name, "fingerprint": run_fp, "steps": result.steps})
        tracker.log_artifact(log_csv)
        tracker.log_metrics({"train/seconds": result.seconds})
    return {"seconds": result.seconds, "resumed_from": result.resumed_from, "steps": result.steps}


def evaluate_run(
    params: Params,
    spec: RunSpec,
    *,
    model_path: Path,
    out_dir: Path,
    metrics_path: Path,
    tracking: TrackingConfig,
    tags: dict[str, str],
    progress: bool = True,
) -> dict[str, Any]:
    """Score one trained model on target val (and source val); write metrics, confusion matrix, sample masks."""
    from plca.evaluation.run_figures import confusion_figure, sample_strip  # matplotlib only when evaluating

    v = params.variant(spec.name).train
    device = resolve_device(params.engine.device)
    if params.engine.threads:
        torch.set_num_threads(params.engine.threads)
    model = load_model(model_path, device)
    # dvc.yaml's evaluate stage declares `methods`, `evaluate` and the variant's `train`, where the alpha comes from
    icfg = InferenceConfig(test_time_aggregation=v.test_time_aggregation, alpha=params.test_time_alpha(spec.name),
                           input_size=params.data.eval_size, batch_size=params.evaluate.batch_size)
    tcfg = params.data.train_transform
    target_reader = make_reader(params.data.target, "val")
    keep = tuple(i for i in params.evaluate.samples if i < len(target_reader))
    target = evaluate(model, target_reader, tcfg, icfg, device, keep=keep, progress=progress,
                      desc=f"evaluate {spec.run_name} target-val")
    summary = {"target": summarize(target.matrix)}
    if icfg.test_time_aggregation and params.evaluate.compare_without_tta:
        plain_cfg = replace(icfg, test_time_aggregation=False)
        plain = evaluate(model, target_reader, tcfg, plain_cfg, device, progress=progress,
                         desc=f"evaluate {spec.run_name} target-val, no aggregation")
        summary["target_without_tta"] = summarize(plain.matrix)
    source_reader = None if params.data.source.val is None else make_reader(params.data.source, "val")
    if params.evaluate.source_val and source_reader is not None:
        src = evaluate(model, source_reader, tcfg, icfg, device, progress=progress,
                       desc=f"evaluate {spec.run_name} source-val")
        summary["source_val"] = summarize(src.matrix)
    cycles = None
    if params.evaluate.cycle_pairs and source_reader is not None:
        # SAGG on the target with the alpha the association trains with (params.test_time_alpha)
        ccfg = CycleConfig(pairs=params.evaluate.cycle_pairs, batch_size=params.evaluate.batch_size,
                           alpha=icfg.alpha, input_size=params.data.eval_size)
        cycles = cycle_diagnostics(model, source_reader, target_reader, tcfg, ccfg, device)
        summary["cycles"] = cycles

    out_dir.mkdir(parents=True, exist_ok=True)
    target.matrix.save(out_dir / "confusion.npy")
    confusion_figure(target.matrix.counts, out_dir / "confusion.png", title=f"{spec.run_name} (target val)")
    strip = []
    for i, (name, pred) in sorted(target.kept.items()):
        atomic_write_png(pred, out_dir / "samples" / f"{name}.png")
        sample = target_reader.read(i)
        strip.append((name, sample.image, sample.label, pred))
    if strip:
        sample_strip(strip, out_dir / "samples.png")
    atomic_write_json({"run": spec.run_name, "test_time_aggregation": v.test_time_aggregation, **summary},
                out_dir / "metrics.json")

    protocol = str(params.data.protocol)
    t = summary["target"]
    compact = {
        "variant": spec.name, "seed": spec.seed,
        "miou": t["mIoU"][protocol],
        "miou19": t["mIoU"]["19"], "miou16": t["mIoU"]["16"], "miou13": t["mIoU"]["13"],
        "source_val_miou": summary.get("source_val", {}).get("mIoU", {}).get(protocol),
        "miou_without_tta": summary.get("target_without_tta", {}).get("mIoU", {}).get(protocol),
        "iou": t["IoU"]["19"],
    }
    if cycles is not None:
        compact["cycles"] = cycles
    atomic_write_json(compact, metrics_path)

    with Tracker(tracking, f"eval-{spec.run_name}", flatten({"run": spec.name, "seed": spec.seed,
                                                              "inference": to_dict(icfg)}), tags) as tracker:
        flat = {f"target/mIoU{p}": m for p, m in t["mIoU"].items() if m is not None}
        flat.update({f"target/IoU/{c}": x for c, x in t["IoU"]["19"].items() if x is not None})
        for key, name in (("source_val_miou", "source_val/mIoU"), ("miou_without_tta", "target/mIoU_without_tta")):
            if compact[key] is not None:
                flat[name] = compact[key]
        if cycles is not None:
            flat.update({f"cycles/{k}": x for k, x in flatten(cycles).items() if x is not None})
        tracker.log_metrics(flat)
        for f in ("metrics.json", "confusion.png", "samples.png"):
            if (out_dir / f).is_file():
                tracker.log_artifact(out_dir / f)
    return compact
