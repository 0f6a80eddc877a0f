"""One run of the pipeline from typed params: build data, model and method; train; evaluate; write outputs.

The stage scripts call these functions; they know params and paths, the engine and the methods do not.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from plca.config import flatten, to_dict
from plca.data.datasets import CityscapesReader, GTA5Reader, SynthiaReader
from plca.data.labels import TRAINID_TO_ID, colorize
from plca.data.rcs import RareClassSampler, RCSConfig, RCSDataset, class_pixel_counts, class_totals
from plca.data.transforms import train_transform
from plca.engine import checkpoint as ckpt
from plca.engine.distributed import DistConfig
from plca.engine.hooks import default_hooks
from plca.engine.streams import KeyedDataset
from plca.engine.tracking import Tracker, TrackingConfig
from plca.engine.trainer import STREAM_IDS, TrainConfig, Trainer, fingerprint, resolve_device
from plca.evaluation.cycles import CycleConfig, cycle_diagnostics
from plca.evaluation.inference import InferenceConfig, evaluate
from plca.evaluation.metrics import summarize
from plca.io import atomic_write_json, atomic_write_png, remove_leftovers
from plca.labelling import (
    PseudoLabelledReader,
    SubsetReader,
    make_pseudo_set,
    read_names,
    read_spatial_prior,
    read_summary,
    write_spatial_prior,
)
from plca.methods.registry import method_config
from plca.models.deeplabv2 import DeepLabV2
from plca.models.ensemble import Ensemble
from plca.models.networks import ARCHS, arch_of, from_saved, saved_config
from plca.models.output import SegmentationModel, class_argmax
from plca.params import DomainConfig, Params, PhaseConfig
from plca.pseudo import location_class_counts, spatial_prior

log = logging.getLogger(__name__)

PRETRAIN = "pretrain"
#: The folder of an evaluation's target-val predictions in Cityscapes label ids (eval/<variant>/s<seed>/labelIds).
PREDICTIONS = "labelIds"
#: The MLflow tag of a run that holds the digest (`file_digest`) of the model it trained or scored.
MODEL_TAG = "model_digest"


def make_reader(domain: DomainConfig, split: str, with_labels: bool = True) -> Any:
    """A reader of one split ("train" | "val") of a domain, in its own on-disk format."""
    which = domain.train if split == "train" else domain.val
    # train None on GTA5/SYNTHIA = every item (they have no official splits; the paper trains on all of them)
    if which is None and (split != "train" or domain.format == "cityscapes"):
        raise ValueError(f"{domain.root}: no '{split}' split configured")
    ids = None if which is None else domain.root / which
    if domain.format == "cityscapes":
        return CityscapesReader(domain.root, which, with_labels=with_labels,
                                ids=domain.train_ids if split == "train" else None)
    if domain.format == "gta5":
        return GTA5Reader(domain.root, ids=ids)
    return SynthiaReader(domain.root, ids=ids)


def save_model(model: SegmentationModel, path: Path, meta: dict[str, Any]) -> None:
    ckpt.atomic_save({**saved_config(model), "state_dict": model.state_dict(), "meta": meta}, path)


def save_ensemble(members: list[Path], weights: tuple[float, ...], path: Path, meta: dict[str, Any]) -> None:
    """One file holding every member model (as `save_model` writes them) and their weights."""
    parts = []
    for member in members:
        state = ckpt.load(member, map_location="cpu")
        if "ensemble" in state:
            raise ValueError(f"{member}: is an ensemble itself; ensemble members are trained models")
        parts.append({k: v for k, v in state.items() if k != "meta"})
    ckpt.atomic_save({"ensemble": parts, "weights": list(weights), "meta": meta}, path)


def load_model(path: Path, device: torch.device | str = "cpu") -> SegmentationModel:
    """A model saved by `save_model` (architecture from the file, no ImageNet weights needed), or an ensemble
    saved by `save_ensemble`."""
    state = ckpt.load(path, map_location=device)
    if "ensemble" in state:
        model: SegmentationModel = Ensemble([from_saved(m) for m in state["ensemble"]], state["weights"])
    else:
        model = from_saved(state)
    return model.to(device)


def load_init(model: SegmentationModel, path: Path, added: dict[str, Any]) -> None:
    """Load the weights of `path` into `model`, which may have parts the file's model lacks because the method
    asked for them (`added`, e.g. the auxiliary head): those keep their fresh initialisation. Anything else
    missing or unexpected is an error naming the file."""
    start = load_model(path)
    if isinstance(start, Ensemble):
        raise ValueError(f"{path}: an ensemble cannot be a starting model")
    if type(start) is not type(model):
        raise ValueError(f"{path}: holds a {arch_of(start)} network; the run trains a {arch_of(model)} network")
    own = {k: v for k, v in vars(start.cfg).items() if k != "pretrained"}
    new = {k: v for k, v in vars(model.cfg).items() if k != "pretrained"}
    differ = {k for k in own if own[k] != new[k] and not (k in added and new[k] == added[k])}
    if differ:
        raise ValueError(f"{path}: its model differs from the one to train in {sorted(differ)}: "
                         + ", ".join(f"{k} {own[k]!r} vs {new[k]!r}" for k in sorted(differ)))
    missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"{path}: weights the model to train does not have: {unexpected[:5]}")
    if missing:
        with torch.random.fork_rng(devices=[]):  # this check's model must not shift the run's later draws
            fresh = set(model.state_dict()) - set(type(start)(replace(start.cfg, pretrained=None)).state_dict())
        lacking = [k for k in missing if k not in fresh]
        if lacking:
            raise ValueError(f"{path}: lacks weights of the model to train: {lacking[:5]}")


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


def _phase_and_method(params: Params, name: str) -> tuple[PhaseConfig, int, str, dict[str, Any], str, bool]:
    """(phase, steps, method, options, labelled stream source, starts from a trained model?) of a run."""
    p = params.pretraining(name)
    if p is not None:
        return p, p.steps, p.method, params.pretrain_options(p), "source", False
    v = params.variant(name).train
    from_model = v.init == PRETRAIN or name in params.runs.rounds
    return params.phase(name), params.steps(name), v.method, params.method_options(name), v.labelled, from_model


def read_class_stats(path: Path) -> list[dict[int, int]]:
    """The per-image class pixel counts `class_stats_run` wrote."""
    try:
        data = json.loads(path.read_text())
        return [{int(c): int(n) for c, n in image.items()} for image in data["counts"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no class statistics; the class_stats stage writes them") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not the class statistics class_stats writes ({exc})") from None


def class_stats_run(params: Params, out_path: Path, progress: bool = True) -> dict[str, Any]:
    """Count the pixels of each class in every source train label (rare class sampling's statistics, computed
    once); written atomically as JSON {"num_classes", "images", "counts": [{class: pixels}, ...]}."""
    reader = make_reader(params.data.source, "train", with_labels=True)
    counts = class_pixel_counts(reader, num_classes=params.model.num_classes, progress=progress)
    totals = class_totals(counts)
    atomic_write_json({"num_classes": params.model.num_classes, "images": len(counts),
                       "totals": {str(c): totals[c] for c in sorted(totals)},
                       "counts": [{str(c): n for c, n in sorted(image.items())} for image in counts]}, out_path)
    return {"images": len(counts), "classes": len(totals)}


def spatial_prior_run(params: Params, out_path: Path, progress: bool = True) -> dict[str, Any]:
    """CBST-SP's spatial prior from the source train labels (params `spatial_prior`): each label resized
    (nearest) to the prior's size, the pixels of each class counted at each location, smoothed and normalised
    over classes (`plca.pseudo.spatial_prior`). Written atomically to `out_path` ([C, h, w] float32 .npy) with a
    preview beside it (`.png`: the most frequent class at each location, in the label colours)."""
    cfg = params.spatial_prior
    num_classes = params.model.num_classes
    reader = make_reader(params.data.source, "train", with_labels=True)
    width, height = cfg.size
    counts = torch.zeros(num_classes, height, width, dtype=torch.int64)
    labelled = 0
    for i in tqdm(range(len(reader)), desc="spatial prior", disable=not progress, dynamic_ncols=True):
        sample = reader.read(i)
        if sample.label is None:
            raise ValueError(f"spatial prior: source item {i} ({sample.name}) has no label")
        label = cv2.resize(sample.label, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
        try:
            counts += location_class_counts(torch.from_numpy(label)[None], num_classes)
        except ValueError as exc:
            raise ValueError(f"spatial prior: source item {i} ({sample.name}): {exc}") from exc
        labelled += 1
    prior = spatial_prior(counts.double(), sigma=cfg.sigma)
    write_spatial_prior(prior, out_path)
    preview = colorize(class_argmax(prior[None])[0].numpy().astype(np.uint8))
    atomic_write_png(np.ascontiguousarray(preview[..., ::-1]), out_path.with_suffix(".png"))  # RGB -> cv2's BGR
    return {"images": labelled, "size": list(cfg.size), "sigma": cfg.sigma,
            "locations_without_labels": int((counts.sum(0) == 0).sum())}


def _streams(params: Params, spec: RunSpec, labelled: str, wants_target: bool,
             pseudo_dir: Path | None, rcs: RCSConfig | None = None,
             class_stats: Path | None = None) -> dict[str, KeyedDataset]:
    """The run's training streams: "source" (labelled images) and, for methods that adapt, "target" (images).
    A round reads both from its pseudo-label set: its labelled images with their pseudo-labels, the rest.
    With `rcs` the source-domain stream draws its images by rare class sampling from `class_stats`."""
    if labelled == "pseudo" and pseudo_dir is None:
        raise ValueError(f"{spec.run_name}: learns from pseudo-labels, but no pseudo-label set was given")
    target_train = params.data.target
    # stream -> (reader, the domain its images come from: which augmentation they get)
    if pseudo_dir is not None:
        target = make_reader(target_train, "train", with_labels=False)
        pseudo_labelled = (PseudoLabelledReader(target, pseudo_dir), "target")
        if labelled == "pseudo":  # IntraDA: the set's labelled images are the new source, the rest the target
            readers = {"source": pseudo_labelled}
            if wants_target:
                hard = read_names(pseudo_dir, "unlabelled")
                readers["target"] = (SubsetReader(target, hard, f"{pseudo_dir}/unlabelled.txt") if hard else target,
                                     "target")
        elif wants_target:  # self-training: source labels, and the set's images with their pseudo-labels
            readers = {"source": (make_reader(params.data.source, "train", with_labels=True), "source"),
                       "target": pseudo_labelled}
        else:
            raise ValueError(f"{spec.run_name}: learns from a pseudo-label set, but its method reads no target")
    else:
        domain = params.data.source if labelled == "source" else target_train
        readers = {"source": (make_reader(domain, "train", with_labels=True), labelled)}
        if wants_target:
            readers["target"] = (make_reader(target_train, "train", with_labels=False), "target")

    def dataset(name: str, reader: Any, domain: str) -> KeyedDataset:
        tcfg = params.transform(domain)
        transform = lambda s, rng: train_transform(s, tcfg, rng)  # noqa: E731
        if rcs is not None and name == "source" and domain == "source":
            if class_stats is None:
                raise ValueError(f"{spec.run_name}: samples rare classes, but no class statistics were given")
            counts = read_class_stats(class_stats)
            if len(counts) != len(reader):
                raise ValueError(f"{class_stats}: counts {len(counts)} images, the source train split has "
                                 f"{len(reader)}; rerun the class_stats stage")
            return RCSDataset(reader, transform, spec.seed, STREAM_IDS[name], RareClassSampler(counts, rcs))
        return KeyedDataset(reader, transform, spec.seed, STREAM_IDS[name])

    return {name: dataset(name, reader, domain) for name, (reader, domain) in readers.items()}


def train_ids_digest(cfg: DomainConfig) -> str | None:
    """The digest of a domain's list file (`train_ids`), None when it has none: what a run's fingerprint records so
    that an edited list never resumes a run made from the old one."""
    return None if cfg.train_ids is None else file_digest(Path(cfg.train_ids))


def training_data(params: Params) -> dict[str, Any]:
    """What a training reads of params `data` (its domains and augmentations; not the report's label, nor how the
    data were prepared, which reach it through the prepared files): its fingerprint and MLflow params."""
    d = params.data

    def domain(cfg: DomainConfig) -> dict[str, Any]:
        # train_ids only when set (the fingerprints of runs on whole splits stay as they were), with its digest
        out = to_dict(cfg)
        if cfg.train_ids is None:
            del out["train_ids"]
        else:
            out["train_ids_digest"] = train_ids_digest(cfg)
        return out

    return {"source": domain(d.source), "target": domain(d.target), "train_transform": to_dict(d.train_transform),
            "target_transform": None if d.target_transform is None else to_dict(d.target_transform)}


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
    pseudo_dir: Path | None = None,
    class_stats: Path | None = None,
    dist: DistConfig | None = None,
) -> dict[str, Any]:
    """Train one run and write `out_dir/model.pt`; resumes from `checkpoint_dir/last.pt` after a crash (and returns
    at once when that checkpoint is of the finished run). The caller removes the checkpoint when it has served.
    `init_model`: the model it starts from (the pretrained one, or a round's); `pseudo_dir`: a round's set;
    `class_stats`: the source labels' class statistics, for a method that samples rare classes; `dist`: this
    process among several (torchrun): only the first writes the model, the log, checkpoints and MLflow."""
    dist = dist or DistConfig()
    phase, steps, method_name, options, labelled, from_model = _phase_and_method(params, spec.name)
    if params.engine.threads:
        torch.set_num_threads(params.engine.threads)
    torch.manual_seed(spec.seed)
    cls, cfg = method_config(method_name, options, where=f"params.variants.{spec.name}.options")
    # parts the method needs on top of the network's options (the multi-level methods' auxiliary head)
    added = cls.model_options(cfg)
    arch, net_cfg = params.network_options(spec.name)
    model_cfg = replace(net_cfg, **added)
    model = ARCHS[arch].build(model_cfg)
    init_digest = None
    if from_model:
        if init_model is None:
            raise ValueError(f"{spec.run_name}: starts from a trained model, but none was given")
        load_init(model, init_model, added)
        init_digest = file_digest(init_model)
    method = cls(model, cfg)
    method.set_normalization(params.data.train_transform)
    rcs = cls.rare_class_sampling(cfg)
    streams = _streams(params, spec, labelled, "target" in method.streams, pseudo_dir, rcs, class_stats)
    # the set's summary holds its policy, options and decisions (thresholds): a changed set never resumes a round
    pseudo_digest = None
    if pseudo_dir is not None:
        pseudo_digest = file_digest(pseudo_dir / "summary.json")
        method.set_pseudo_labels(read_summary(pseudo_dir))
    tcfg = TrainConfig(steps=steps, seed=spec.seed, optim=phase.optim, engine=params.engine, dist=dist)
    run_params = {
        "run": spec.name, "seed": spec.seed, "method": method_name, "labelled": labelled,
        "options": options, "phase": to_dict(phase), "engine": params.engine.fingerprint_dict(),
        "model": to_dict(model_cfg), "data": training_data(params), "init_model": init_digest,
    }
    if steps != phase.steps:  # keys only when they apply: the fingerprints of existing runs stay as they were
        run_params["steps"] = steps
    if pseudo_digest is not None:
        run_params["pseudo_labels"] = pseudo_digest
    if rcs is not None and class_stats is not None:  # a run that samples rare classes resumes on the same stats
        run_params["class_stats"] = file_digest(class_stats)
    run_fp = fingerprint(run_params)
    trainer = Trainer(tcfg)
    code = ckpt.source_digest(Path(__file__).parent)
    # a killed training continues its MLflow run only where its checkpoint can resume: the same params and code
    tracking = tracking if dist.main else replace(tracking, enabled=False)
    with Tracker(tracking, spec.run_name, flatten(run_params), tags,
                 match={"fingerprint": run_fp, "code": code}) as tracker:
        e = params.engine
        checkpoint = checkpoint_dir / "last.pt"
        if dist.main:  # what a killed write of this run left beside its files
            for path in (checkpoint, ckpt.digest_file(checkpoint), log_csv, out_dir / "model.pt"):
                remove_leftovers(path)
        hooks = default_hooks(steps_name=method.name, log_every=e.log_every, checkpoint_every=e.checkpoint_every,
                              checkpoint_path=checkpoint, fingerprint=run_fp, log_csv=log_csv,
                              tracker=tracker, progress=progress, code=code, main=dist.main)
        result = trainer.fit(method, streams, hooks)
        if dist.main:  # the other processes hold the same weights and track nothing
            model_file = out_dir / "model.pt"
            save_model(model, model_file, {"run": spec.run_name, "fingerprint": run_fp, "steps": result.steps})
            tracker.set_tags({MODEL_TAG: file_digest(model_file)})
            tracker.log_artifact(log_csv)
            tracker.log_metrics({"train/seconds": result.seconds})
            if tracking.log_models:
                tracker.log_artifact(model_file, "model")
                with tempfile.TemporaryDirectory() as tmp:  # the config the model was trained with, beside it
                    atomic_write_json(run_params, Path(tmp) / "config.json")
                    tracker.log_artifact(Path(tmp) / "config.json", "model")
    return {"seconds": result.seconds, "resumed_from": result.resumed_from, "steps": result.steps}


def inference_config(params: Params, name: str) -> InferenceConfig:
    """How variant `name` is scored: test-time aggregation as it says, with its method's alpha (else
    `evaluate.test_time_alpha`), at `data.eval_size`."""
    return InferenceConfig(test_time_aggregation=params.variant(name).train.test_time_aggregation,
                           alpha=params.test_time_alpha(name), input_size=params.data.eval_size,
                           batch_size=params.evaluate.batch_size)


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
    """Score one trained model on target val (and source val); write metrics, confusion matrix, sample masks and
    every target-val prediction in Cityscapes label ids (`out_dir/labelIds/<frame>.png`)."""
    from plca.evaluation.run_figures import confusion_figure, sample_strip  # matplotlib only when evaluating

    v = params.variant(spec.name).train
    device = resolve_device(params.engine.device)
    if params.engine.threads:
        torch.set_num_threads(params.engine.threads)
    model = load_model(model_path, device)
    # dvc.yaml's evaluate stage declares `methods`, `evaluate` and the variant's `train`, where the alpha comes from
    icfg = inference_config(params, spec.name)
    tcfg = params.data.train_transform
    target_reader = make_reader(params.data.target, "val")
    keep = tuple(i for i in params.evaluate.samples if i < len(target_reader))
    # every target-val prediction in Cityscapes label ids, named by frame, as the official evaluator and benchmark
    # submissions read them: `python -m plca.score <out_dir>/labelIds <gtFine/val>` gives this run's mIoU
    pred_dir = out_dir / PREDICTIONS
    shutil.rmtree(pred_dir, ignore_errors=True)  # no file of an earlier evaluation stays among them
    # what a killed write of an earlier evaluation left beside its files
    for path in (metrics_path, *(out_dir / f for f in ("metrics.json", "confusion.npy", "confusion.png",
                                                        "samples.png"))):
        remove_leftovers(path)
    for tmp in (out_dir / "samples").glob(".*.tmp"):
        tmp.unlink(missing_ok=True)

    def write_prediction(name: str, train_ids: np.ndarray) -> None:
        atomic_write_png(TRAINID_TO_ID[train_ids], pred_dir / f"{name}.png")

    target = evaluate(model, target_reader, tcfg, icfg, device, keep=keep, progress=progress,
                      desc=f"evaluate {spec.run_name} target-val", on_prediction=write_prediction)
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
    # an ensemble has no feature map of its own to associate
    if params.evaluate.cycle_pairs and source_reader is not None and isinstance(model, DeepLabV2):
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

    # into the run that trained this model (by its digest) in this experiment, else a run of its own
    with Tracker(tracking, spec.run_name, flatten({"eval": {"inference": to_dict(icfg)}}), tags,
                 match={MODEL_TAG: file_digest(model_path)}) as tracker:
        flat = {f"target/mIoU{p}": m for p, m in t["mIoU"].items() if m is not None}
        flat.update({f"target/IoU/{c}": x for c, x in t["IoU"]["19"].items() if x is not None})
        for key, name in (("source_val_miou", "source_val/mIoU"), ("miou_without_tta", "target/mIoU_without_tta")):
            if compact[key] is not None:
                flat[name] = compact[key]
        if cycles is not None:
            flat.update({f"cycles/{k}": x for k, x in flatten(cycles).items() if x is not None})
        tracker.log_metrics(flat)
        for f in ("metrics.json", "confusion.png", "confusion.npy", "samples.png"):
            if (out_dir / f).is_file():
                tracker.log_artifact(out_dir / f, "evaluation")
        if tracking.log_predictions:
            tracker.log_artifact(pred_dir, f"evaluation/{PREDICTIONS}")
    return compact


def ensemble_run(params: Params, spec: RunSpec, *, members: list[Path], out_dir: Path) -> dict[str, Any]:
    """Assemble the ensemble variant `spec.name` (params `runs.ensembles`) from its members' models of the seed:
    `out_dir/model.pt`, which `load_model` reads as one model averaging their logits."""
    wiring = params.runs.ensembles[spec.name]
    meta = {"run": spec.run_name, "members": list(wiring.members), "weights": list(wiring.weights),
            "member_digests": [file_digest(m) for m in members]}
    save_ensemble(members, wiring.weights, out_dir / "model.pt", meta)
    return meta


def pseudo_label_run(
    params: Params,
    name: str,
    seed: int,
    *,
    model_path: Path,
    out_dir: Path,
    tracking: TrackingConfig,
    tags: dict[str, str],
    progress: bool = True,
    prior_path: Path | None = None,
) -> dict[str, Any]:
    """Write pseudo-label set `name` (params `pseudo.<name>`) of one seed: the target train images predicted by
    `model_path`, labelled as the set's policy decides (`plca.labelling`), to `out_dir`, atomically. A set with
    `spatial_prior` reads the prior from `prior_path` (`spatial_prior_run`'s output)."""
    cfg = params.pseudo[name]
    prior = None
    if cfg.spatial_prior:
        if prior_path is None:
            raise ValueError(f"pseudo.{name}: spatial_prior is set, but no spatial prior file was given")
        prior = read_spatial_prior(prior_path, params.model.num_classes)
    device = resolve_device(params.engine.device)
    if params.engine.threads:
        torch.set_num_threads(params.engine.threads)
    model = load_model(model_path, device)
    reader = make_reader(params.data.target, "train", with_labels=cfg.precision)
    summary = make_pseudo_set(model, reader, params.data.train_transform, cfg, out_dir, device, progress=progress,
                              desc=f"pseudo-labels {name} s{seed}", prior=prior)
    run_params = {"pseudo": name, "seed": seed, "model": file_digest(model_path), **to_dict(cfg)}
    for key in ("flip", "spatial_prior"):  # keys only when they apply: the fingerprints of existing sets stay
        if not run_params[key]:            # as they were
            del run_params[key]
    if cfg.spatial_prior:  # the prior it applied (read above, so prior_path is set)
        run_params["prior"] = file_digest(prior_path)
    if params.data.target.train_ids is not None:
        run_params["train_ids"] = train_ids_digest(params.data.target)
    with Tracker(tracking, f"pseudo-{name}-s{seed}", flatten(run_params), tags,
                 match={"fingerprint": fingerprint(run_params)}) as tracker:
        tracker.log_metrics({f"pseudo/{k}": float(v) for k, v in summary.items()
                             if isinstance(v, int | float) and not isinstance(v, bool)})
        tracker.log_artifact(out_dir / "summary.json")
    return summary
