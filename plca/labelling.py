"""Pseudo-label sets: a trained model predicts every target training image, a policy decides which images get
labels and what the labels are, and the set is written whole (label PNGs, the two image lists, per-image scores,
a summary): the output of a DVC stage that a later training stage, a round, learns from.

A policy sees the predictions twice: `observe` every image (pass 1: scores, statistics), then `select` splits the
images into labelled and unlabelled, then `label` each labelled image (pass 2). A policy whose split needs the whole
set's statistics first (TPLD's image confidence needs the class thresholds) also sets `reviews` and is shown every
image once more between the two (`review`). The network outputs of pass 1 are kept for the later passes as far as
`OUTPUT_CACHE_BYTES` allows (the rest are predicted again), so memory stays bounded whatever the set's size.
Policies register themselves from the method module that needs them (`register_policy`), so a method with rounds
stays one file. Labels never come from the target's ground truth: when the dataset has it, it only scores the
pseudo-labels (`precision`), a diagnostic.

Set layout (one folder per seed): `labels/<image name>.png` (train ids, 255 = unlabelled pixel) for every labelled
image, `labelled.txt` and `unlabelled.txt` (image names, one a line), `images.csv` (name, score, split),
`summary.json` (policy, options, counts, the diagnostic). A policy that gives soft labels (CRST's LRENT) also
writes `soft/<image name>.npz` ("soft": [C, H, W] float16 class weights per pixel, zero where unlabelled; float16
and compressed, as most weights are tiny: the label PNG keeps their argmax), which a round then learns from.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from plca.data.datasets import Sample, read_label_png
from plca.data.labels import IGNORE_INDEX
from plca.data.transforms import TransformConfig, eval_transform
from plca.io import atomic_dir, atomic_write, atomic_write_json, atomic_write_png, atomic_write_text, remove_leftovers
from plca.models.output import LOGITS
from plca.pseudo import apply_spatial_prior
from plca.registry import Registry

LABELS_DIR = "labels"
SOFT_DIR = "soft"
LABELLED, UNLABELLED = "labelled", "unlabelled"


@dataclass
class PseudoSetConfig:
    """One pseudo-label set (params `pseudo.<name>`): how the target train images are predicted and which policy
    (`POLICIES`) decides what is labelled."""

    #: The policy's name, e.g. `entropy_rank` (IntraDA).
    policy: str
    #: The policy's options (its config dataclass fills in the rest).
    options: dict[str, Any] = field(default_factory=dict)
    #: Network input size (w, h) the images are resized to (IntraDA: 1024 x 512); null = as stored. Predictions
    #: are upsampled to the stored size, where the label PNGs are written.
    input_size: tuple[int, int] | None = None
    batch_size: int = 8
    #: Also predict each image mirrored and average the two softmaxes at the stored size (the released CRST); the
    #: policy then sees the log of the average as logits.
    flip: bool = False
    #: Score the pseudo-labels against the target train labels when the dataset has them (a diagnostic in the
    #: set's summary; labels never train).
    precision: bool = True
    #: CBST-SP: the policy sees each pixel's class probabilities times the source's spatial prior (the
    #: `spatial_prior` stage's output, `plca.pseudo.apply_spatial_prior`); for policies that take one
    #: (`Policy.takes_prior`: the class-balanced family).
    spatial_prior: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SpatialPriorConfig:
    """The source's spatial prior, CBST-SP's q_n(c) (params `spatial_prior`, the `spatial_prior` stage): the class
    frequencies of the source train labels at each location, smoothed (`plca.pseudo.spatial_prior`)."""

    #: (w, h): the source labels are resized to it (nearest) before counting; the prior's size, resized
    #: bilinearly to each target image's stored size where a set applies it.
    size: tuple[int, int] = (128, 64)
    #: The smoothing Gaussian's window as a share of the prior's width: the paper's 70 x 70 kernel at Cityscapes'
    #: 2048 (70 / 2048). Its sigma is a sixth of the window (the paper does not give one: ours); 0 = no smoothing.
    window: float = 0.0342

    def __post_init__(self) -> None:
        self.size = tuple(self.size)  # type: ignore[assignment]
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (w, h) >= 1, got {self.size}")
        if not 0 <= self.window < 1:
            raise ValueError(f"window must be a share of the width in [0, 1), got {self.window}")

    @property
    def sigma(self) -> float:
        """The Gaussian's sigma in pixels of the prior."""
        return self.window * self.size[0] / 6


def write_spatial_prior(prior: torch.Tensor, path: Path) -> None:
    """Write a [C, h, w] prior as float32 .npy, atomically."""
    array = prior.to(torch.float32).cpu().numpy()
    atomic_write(path, lambda f: np.save(f, array))


def read_spatial_prior(path: Path, num_classes: int) -> torch.Tensor:
    """A prior written by `write_spatial_prior`, checked: [num_classes, h, w], finite, >= 0."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no spatial prior; the spatial_prior stage writes it (dvc repro "
                                "spatial_prior)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a spatial prior (.npy): {exc}") from exc
    if array.ndim != 3 or array.shape[0] != num_classes:
        raise ValueError(f"{path}: a spatial prior is [C = {num_classes}, h, w], got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{path}: a spatial prior holds finite values >= 0 (dtype {array.dtype})")
    return torch.from_numpy(array.astype(np.float32))


@dataclass
class Selection:
    """What a policy decided after seeing every image: which get labels, and a score per image to record."""

    labelled: list[str]
    unlabelled: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    #: Anything else the summary should keep (thresholds, ...).
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SoftLabels:
    """What `Policy.label` returns for soft labels: the hard labels [H, W] uint8 (argmax, 255 where unlabelled: the
    PNG, the precision) and the soft ones [C, H, W] (zero where unlabelled: what trains)."""

    hard: np.ndarray
    soft: np.ndarray


class Policy:
    """Base class of pseudo-label policies; subclasses set `name` and override the three calls."""

    name: ClassVar[str] = "policy"
    #: Whether `review` sees every image between `observe` and `select` (a pass of its own).
    reviews: ClassVar[bool] = False
    #: Whether its labels come from `probabilities`, so that a set may give it a spatial prior.
    takes_prior: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        #: [C, h, w] spatial prior of a set with `spatial_prior` (CBST-SP), else None.
        self.prior: torch.Tensor | None = None
        self._resized: tuple[tuple[Any, ...], torch.Tensor] | None = None  # the prior at the last size asked

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The class probabilities of [N, C, H, W] (or one image's [C, H, W]) logits: their softmax, times the
        spatial prior when the set has one (not renormalised, as the released CBST)."""
        single = logits.dim() == 3
        probs = logits.softmax(0 if single else 1)
        if self.prior is None:
            return probs
        # resized once per image size (a set's images share one), not once per call
        key = (tuple(probs.shape[-2:]), probs.dtype, probs.device)
        if self._resized is None or self._resized[0] != key:
            self._resized = (key, apply_spatial_prior(probs.new_ones(1, *probs.shape[-3:]), self.prior)[0])
        probs = apply_spatial_prior(probs[None] if single else probs, self._resized[1])
        return probs[0] if single else probs

    def observe(self, names: list[str], logits: torch.Tensor) -> None:
        """Pass 1: [N, C, H, W] float32 logits of the images `names` at their stored size."""
        raise NotImplementedError

    def review(self, names: list[str], logits: torch.Tensor) -> None:
        """The pass after `observe` when `reviews` is set: the same images and logits, in the same order."""
        raise NotImplementedError

    def select(self) -> Selection:
        raise NotImplementedError

    def label(self, name: str, logits: torch.Tensor) -> np.ndarray | SoftLabels:
        """Pass 2, for a labelled image: [C, H, W] logits -> [H, W] uint8 train ids, 255 where unlabelled (or
        `SoftLabels`, those and the soft labels)."""
        raise NotImplementedError


_POLICIES: Registry[type[Policy]] = Registry("pseudo-label policy")
#: name -> (policy class, its config dataclass)
POLICIES = _POLICIES.entries
#: Class decorator: register a Policy subclass under its `name`, with the dataclass of its options.
register_policy = _POLICIES.register


def build_policy(name: str, options: dict[str, Any], where: str = "policy") -> Policy:
    """Instantiate policy `name`, its options validated against its config dataclass."""
    cls, cfg = _POLICIES.config(name, options, where)
    return cls(cfg)


#: The network outputs of the scoring pass kept for the labelling pass, at most this many bytes (at the network's
#: resolution, before upsampling: about 1.9 GB for Cityscapes' 2,975 train images at 1024x512); the rest are
#: predicted again. The same batches give the same outputs either way.
OUTPUT_CACHE_BYTES = 2 << 30


def _predictions(model: torch.nn.Module, reader: Any, tcfg: TransformConfig, cfg: PseudoSetConfig,
                 device: torch.device, desc: str, progress: bool, cache: list[torch.Tensor] | None = None,
                 ) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    """(samples, [N, C, H, W] float32 logits at the stored size) for consecutive same-size images of `reader`.
    `cache`: the network outputs of the batches, in order, as far as they were kept; filled while it is empty
    (up to OUTPUT_CACHE_BYTES), read when it holds a batch's output."""
    filling = cache is not None and not cache
    cached = 0

    def flush(batch: list[tuple[Sample, np.ndarray]], k: int) -> tuple[list[Sample], torch.Tensor]:
        nonlocal cached
        h, w = batch[0][0].image.shape[:2]
        if cache is not None and not filling and k < len(cache):
            logits = cache[k].to(device)
        else:
            images = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
            with torch.no_grad():
                logits = model(images)[LOGITS].float()
                if cfg.flip:  # [2, N, C, h, w]: the image's and its mirror's, mirrored back
                    logits = torch.stack([logits, model(images.flip(-1))[LOGITS].float().flip(-1)])
            if filling and cached + logits.numel() * 4 <= OUTPUT_CACHE_BYTES and len(cache) == k:
                cache.append(logits.cpu())
                cached += logits.numel() * 4
        with torch.no_grad():
            if not cfg.flip:
                return [b[0] for b in batch], model.upsample(logits, (h, w))
            # as the released CRST: each upsampled, their softmaxes averaged; floored so that the log is finite
            probs = (model.upsample(logits[0], (h, w)).softmax(1) + model.upsample(logits[1], (h, w)).softmax(1)) / 2
            return [b[0] for b in batch], probs.clamp_(min=torch.finfo(probs.dtype).tiny).log_()

    model.eval()
    batch: list[tuple[Sample, np.ndarray]] = []
    k = 0  # the batch's position
    with tqdm(total=len(reader), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for i in range(len(reader)):
            sample = reader.read(i)
            image, _ = eval_transform(sample, tcfg, cfg.input_size)
            if batch and (image.shape != batch[0][1].shape or sample.image.shape != batch[0][0].image.shape
                          or len(batch) == cfg.batch_size):
                yield flush(batch, k)
                bar.update(len(batch))
                batch, k = [], k + 1
            batch.append((sample, image))
        if batch:
            yield flush(batch, k)
            bar.update(len(batch))


def make_pseudo_set(model: torch.nn.Module, reader: Any, tcfg: TransformConfig, cfg: PseudoSetConfig,
                    out_dir: Path, device: torch.device, progress: bool = True, desc: str = "pseudo-labels",
                    prior: torch.Tensor | None = None) -> dict[str, Any]:
    """Predict every image of `reader` (the target train split) with `model`, let the policy of `cfg` choose and
    label, and write the set to `out_dir` atomically (see the module docstring). Returns its summary. `prior`:
    the [C, h, w] spatial prior a set with `spatial_prior` applies."""
    policy = build_policy(cfg.policy, cfg.options, f"pseudo set {out_dir}: options")
    if cfg.spatial_prior:
        if not policy.takes_prior:
            raise ValueError(f"pseudo set {out_dir}: spatial_prior is set, but policy '{cfg.policy}' takes no "
                             "spatial prior (its labels do not come from class probabilities)")
        if prior is None:
            raise ValueError(f"pseudo set {out_dir}: spatial_prior is set, but no spatial prior was given")
        policy.prior = prior.to(device)
    names = list(reader.names)
    if len(set(names)) != len(names):
        raise ValueError(f"{reader.root}: image names repeat; a pseudo-label set keys its labels by name")
    outputs: list[torch.Tensor] = []  # the scoring pass's network outputs, which the labelling pass reuses
    for samples, logits in _predictions(model, reader, tcfg, cfg, device, f"{desc} (scoring)", progress, outputs):
        policy.observe([s.name for s in samples], logits)
    if policy.reviews:
        for samples, logits in _predictions(model, reader, tcfg, cfg, device, f"{desc} (reviewing)", progress,
                                            outputs):
            policy.review([s.name for s in samples], logits)
    sel = policy.select()
    if sorted([*sel.labelled, *sel.unlabelled]) != sorted(names):
        raise RuntimeError(f"policy '{cfg.policy}' did not split the images exactly once each")
    chosen = set(sel.labelled)
    correct = labelled_px = valid_px = 0
    remove_leftovers(out_dir)  # the temporary folder of a killed write of this set
    with atomic_dir(out_dir) as tmp:
        if chosen:
            for samples, logits in _predictions(model, reader, tcfg, cfg, device, f"{desc} (labelling)", progress,
                                                outputs):
                for sample, lg in zip(samples, logits, strict=True):
                    if sample.name not in chosen:
                        continue
                    label = policy.label(sample.name, lg)
                    if isinstance(label, SoftLabels):
                        soft = label.soft.astype(np.float16)
                        atomic_write(tmp / SOFT_DIR / f"{sample.name}.npz",
                                     lambda f, soft=soft: np.savez_compressed(f, soft=soft))
                        label = label.hard
                    atomic_write_png(label, tmp / LABELS_DIR / f"{sample.name}.png")
                    if cfg.precision and sample.label is not None:
                        truth = sample.label
                        valid = truth != IGNORE_INDEX
                        mine = valid & (label != IGNORE_INDEX)
                        correct += int((label[mine] == truth[mine]).sum())
                        labelled_px += int(mine.sum())
                        valid_px += int(valid.sum())
        atomic_write_text(tmp / f"{LABELLED}.txt", "".join(f"{n}\n" for n in sel.labelled))
        atomic_write_text(tmp / f"{UNLABELLED}.txt", "".join(f"{n}\n" for n in sel.unlabelled))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["name", "score", "split"])
        for n in names:
            score = sel.scores.get(n)
            writer.writerow([n, "" if score is None else repr(float(score)), LABELLED if n in chosen else UNLABELLED])
        atomic_write_text(tmp / "images.csv", buf.getvalue())
        summary = {
            "policy": cfg.policy, "options": dict(cfg.options), "images": len(names),
            "labelled": len(sel.labelled), "unlabelled": len(sel.unlabelled),
            **({"spatial_prior": True} if cfg.spatial_prior else {}), **sel.summary,
            # share of the labelled images' ground-truth pixels that got a label, and how many of those are right
            "coverage": labelled_px / valid_px if valid_px else None,
            "precision": correct / labelled_px if labelled_px else None,
        }
        atomic_write_json(summary, tmp / "summary.json")
    return summary


def read_names(set_dir: Path, split: str) -> list[str]:
    """The image names of a set's split (`labelled` or `unlabelled`)."""
    path = Path(set_dir) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pseudo-label list; is {set_dir} a pseudo-label set (stage pseudo)?")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_summary(set_dir: Path) -> dict[str, Any]:
    """A set's `summary.json` (its policy, options and decisions)."""
    path = Path(set_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such summary; is {set_dir} a pseudo-label set (stage pseudo)?")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON summary: {exc}") from exc
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


class SubsetReader:
    """The images `names` of `reader` (any order), read as `reader` reads them; no labels."""

    def __init__(self, reader: Any, names: list[str], what: str) -> None:
        index = {n: i for i, n in enumerate(reader.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"{what}: {len(missing)} image(s) not in {reader.root} (e.g. {missing[0]})")
        if not names:
            raise ValueError(f"{what}: no images")
        self.reader, self.names, self.root = reader, list(names), reader.root
        self._index = [index[n] for n in names]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> Sample:
        sample = self.reader.read(self._index[i])
        return Sample(image=sample.image, label=None, name=sample.name)


class PseudoLabelledReader(SubsetReader):
    """A set's labelled images of `reader` with their pseudo-labels as labels (a round's labelled stream)."""

    def __init__(self, reader: Any, set_dir: Path) -> None:
        self.set_dir = Path(set_dir)
        super().__init__(reader, read_names(self.set_dir, LABELLED), f"{self.set_dir}/{LABELLED}.txt")
        #: The set has soft labels (CRST's LRENT): every labelled image then has one, which the sample carries.
        self.soft = (self.set_dir / SOFT_DIR).is_dir()

    def read(self, i: int) -> Sample:
        sample = super().read(i)
        path = self.set_dir / LABELS_DIR / f"{sample.name}.png"
        label = read_label_png(path)
        if label.shape != sample.image.shape[:2]:
            raise ValueError(f"{path}: pseudo-label is {label.shape[1]}x{label.shape[0]} (WxH) but its image is "
                             f"{sample.image.shape[1]}x{sample.image.shape[0]}")
        soft = read_soft_labels(self.set_dir / SOFT_DIR / f"{sample.name}.npz", label.shape) if self.soft else None
        return Sample(image=sample.image, label=label, name=sample.name, soft_label=soft)


def read_soft_labels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A set's soft labels of one image ([C, H, W] float32); `size` = (H, W) its label's."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: soft pseudo-label not found, but its set has soft labels (folder "
                                f"{path.parent}); was the set written whole?")
    try:
        with np.load(path) as f:
            soft = f["soft"].astype(np.float32)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a soft pseudo-label file (an .npz with array 'soft'): {exc}") from exc
    if soft.ndim != 3 or soft.shape[1:] != tuple(size):
        raise ValueError(f"{path}: soft pseudo-label is {list(soft.shape)}, expected [C, {size[0]}, {size[1]}] as "
                         "its label PNG")
    return soft
