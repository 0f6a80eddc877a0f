"""The typed form of params.yaml: one dataclass per section, validated at stage start.

An unknown key, a missing key or a wrong type stops the stage with an error that names the key
(see `plca.config.from_dict`). Cross-section checks (every variant that runs defined, methods known, the report's
roles naming defined variants) live here too.

A variant is one entry of `variants`: `train` is what its stages train and evaluate with, `show` what the report
shows of it; dvc.yaml's training and evaluation stages depend on `variants.<name>.train` only, so relabelling a
row reruns only the report. Which variants run is `runs` (plain lists: dvc.yaml's matrices iterate them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from plca.config import ConfigError, from_dict, load_yaml
from plca.data.embedded import EmbeddedConfig
from plca.data.prepare import RealDataConfig
from plca.data.transforms import TransformConfig
from plca.engine.optim import OptimConfig
from plca.engine.tracking import TrackingConfig
from plca.engine.trainer import EngineConfig
from plca.labelling import POLICIES, PseudoSetConfig, SpatialPriorConfig
from plca.losses.constants import DEFAULT_ALPHA
from plca.methods import METHODS
from plca.models.deeplabv2 import DeepLabV2Config
from plca.models.networks import ARCHS, DEFAULT_ARCH, network_config


@dataclass
class DomainConfig:
    """Where one domain's images live and in which on-disk format."""

    format: Literal["gta5", "cityscapes", "synthia"]
    root: Path
    #: gta5/synthia: list files (one id per line, relative to root) choosing the train and val items;
    #: cityscapes: the split folder names. train None (gta5/synthia only) = every item: the real GTA5 and
    #: SYNTHIA have no official splits, and the paper trains on all of them.
    train: str | None = "train"
    val: str | None = "val"
    #: cityscapes: a list file (relative to the repository or absolute) keeping only those images of the train
    #: split, one name a line (`aachen_000000_000019`, its image file or a path to it: the released CRST's
    #: `train_ClsConfSet.lst` of 505 images works as it is); null = the whole split.
    train_ids: str | None = None

    def __post_init__(self) -> None:
        if self.train_ids is not None and self.format != "cityscapes":
            raise ValueError(f"train_ids is for cityscapes; a {self.format} train list file goes in 'train'")


@dataclass
class DataConfig:
    #: Names the domain pair in every report, so toy numbers are never read as paper numbers.
    label: str
    #: The prepared data folder (the prepare stage's output; every training stage depends on it).
    root: Path
    source: DomainConfig
    target: DomainConfig
    #: Training augmentation; its normalisation also applies at evaluation.
    train_transform: TransformConfig
    #: The target domain's training augmentation when it differs (the released adversarial codes resize GTA5 to
    #: 1280x720 and Cityscapes to 1024x512); null = train_transform. Same normalisation required.
    target_transform: TransformConfig | None = None
    #: Evaluation input size (w, h) the image is resized to (paper: 1460 x 730); None = as stored.
    eval_size: tuple[int, int] | None = None
    #: Classes in the evaluation protocol: 19 (GTA5 -> Cityscapes) or 16 (SYNTHIA -> Cityscapes; 13 also reported).
    protocol: Literal[19, 16] = 19
    #: Generator settings of the embedded pair; None for real datasets.
    embedded: EmbeddedConfig | None = None
    #: Real datasets to download, verify and pre-resize into <root>/<dataset> (the paper profiles); None else.
    prepare: RealDataConfig | None = None


@dataclass
class PhaseConfig:
    """One training phase: how long and with which optimiser."""

    steps: int
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.steps < 0:  # 0 is a model as initialised (the benchmarks' pretraining)
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class PretrainConfig(PhaseConfig):
    """Source-only pretraining that every variant starts from (same seed): its method and options (over the
    method's shared options, `methods.<method>`)."""

    method: str = field(kw_only=True)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class NetworkConfig:
    """A segmentation network besides params `model` (params `networks.<name>`): its architecture, its own
    source-only pretraining (stage pretrain_network@<name> writes models/pretrain_<name>, which its variants start
    from, seed by seed) and the optimiser its variants train with (`adapt.steps` steps, as every other row)."""

    #: An architecture of `plca.models.networks.ARCHS` (`mit_daformer`: MiT encoder + DAFormer head).
    arch: str
    #: The architecture's options (`mit_daformer`: `plca.models.DAFormerConfig`; `pretrained`: SegFormer's mit_b*.pth).
    model: dict[str, Any]
    pretrain: PretrainConfig
    #: The optimiser of its variants (runs.networks): DAFormer's AdamW with the head at 10x and a warmup.
    optim: OptimConfig


@dataclass
class TrainSpec:
    """What a variant's stages train and evaluate with (params `variants.<name>.train`)."""

    #: A method of the registry (plca.methods.METHODS); null for an ensemble of trained variants, which is not
    #: trained but assembled (`runs.ensembles` names its members).
    method: str | None = None
    #: Which labelled stream trains it: the source domain, the target's own labels (the oracle), or the labelled
    #: images of a pseudo-label set (a round, `runs.rounds`; the set's other images are its target stream).
    labelled: Literal["source", "target", "pseudo"] = "source"
    #: Start from the source-only pretrained model of the same seed, or from the model's initialisation. A round
    #: (`runs.rounds`) starts from the model its wiring names instead.
    init: Literal["pretrain", "scratch"] = "pretrain"
    #: This training is one of `steps_split` equal parts of its phase's steps (`adapt.steps`): a method trained in
    #: two stages (IntraDA) or three rounds gives each 1/2 or 1/3, so every row gets the same optimiser steps.
    steps_split: int = 1
    #: Its segmenter's learning rates (`optim.lr`, the heads' multiple kept) times this factor: a schedule across
    #: rounds, e.g. the CBST code's lr / sqrt(2) a round (profiles/cbst_mxnet.yaml).
    lr_scale: float = 1.0
    #: Its own phase (steps, split by `steps_split`, and optimiser) instead of its group's (`adapt`, `oracle`, its
    #: network's): rounds that follow another method's recipe, e.g. CRST's rounds after PLCA's training
    #: (profiles/plca_crst.yaml).
    phase: PhaseConfig | None = None
    #: Test-time aggregation of features then probabilities (Sec. 3.5); on for PLCA models.
    test_time_aggregation: bool = False
    #: Method options; the method's shared options (`methods.<method>`) supply the rest.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {self.lr_scale}")


@dataclass
class PublishedConfig:
    """A method's published mIoU on the real benchmarks (DeepLab-v2 ResNet-101 unless `source` says otherwise),
    shown beside our measured row in Table 2's labelled columns: facts from papers, never our numbers."""

    #: Where the figures come from (paper and table, or repository), printed under the table.
    source: str
    #: GTA5 -> Cityscapes, 19 classes.
    gta5: float | None = None
    #: SYNTHIA -> Cityscapes, 16 and 13 classes.
    synthia16: float | None = None
    synthia13: float | None = None
    #: How the figure was obtained when it differs from ours (e.g. the best of snapshots scored on Cityscapes val,
    #: where we take the last iterate), printed with the source.
    note: str | None = None


#: The tables a variant can be a row of: Table 1 (ablation) and Tables 2/3 (per class).
TABLES: tuple[str, ...] = ("table1", "table2")


@dataclass
class ShowConfig:
    """What the report shows of a variant (params `variants.<name>.show`; plca.report.config.Presentation)."""

    #: Its row label in the tables and its name in figure legends.
    label: str
    #: The tables it is a row of when it runs: table1, table2.
    tables: list[Literal["table1", "table2"]]
    #: A shorter name for figure column titles and the reports index (default: label).
    short: str | None = None
    #: Its colour in every figure, "#rrggbb" (default: a spare colour, stable for the name).
    colour: str | None = None
    #: The column of the paper's Table 1 it is compared with (plca.report.paper.TABLE1_COLUMNS, checked by the
    #: report); null: ours alone, no paper figure.
    paper: str | None = None
    #: The method's published figures, shown beside the row in Table 2 (null: none).
    published: PublishedConfig | None = None
    #: The variant this row's Table 2 gain is paired against instead of `report.baseline`: a row trained on
    #: another network against that network's own source-only row (null: report.baseline).
    baseline: str | None = None


@dataclass
class ReportConfig:
    """The report's roles (params `report`), each a variant; a role whose variant did not run is left out."""

    #: Every gain (Δ) is paired by seed against it.
    baseline: str
    #: reports/README.md's sentence: this variant against the baseline (null: none).
    headline: str | None
    #: The prediction columns of figures/qualitative.png.
    qualitative: list[str]
    #: The bars of figures/class_iou.png.
    class_iou: list[str]
    #: The control row explained under Table 1: PLCA's training with no target loss (null: none).
    control: str | None = None


@dataclass
class VariantConfig:
    """One variant: what it trains with, apart from what the report shows of it."""

    train: TrainSpec
    show: ShowConfig


#: A mapping a profile overlay replaces whole instead of merging (plca.profiles): it selects what runs.
_SELECTION = {"overlay": "replace"}
#: The shared source-only model's run name (models/pretrain): a round can start from it, a set be labelled by it.
PRETRAINED = "pretrain"
#: The folder under metrics/ of the pseudo-label sets' summaries; no variant may take its name.
PSEUDO_METRICS = "pseudo"
#: Run name prefix of a network's source-only pretraining (models/pretrain_<network>).
NETWORK_PRETRAIN = "pretrain_"


@dataclass
class RoundWiring:
    """Where a round (`runs.rounds`) starts and what it learns from."""

    #: The model it starts from, seed by seed: `pretrain` or a trained variant.
    init: str
    #: The pseudo-label set (`runs.pseudo`) whose labelled images are its labelled stream, the rest its target.
    pseudo: str


@dataclass
class EnsembleWiring:
    """An ensemble (`runs.ensembles`): two trained variants whose logits are averaged at evaluation."""

    #: The two variants, seed by seed (dvc.yaml's ensemble stage depends on exactly two models).
    members: tuple[str, str]
    #: Weights of their logits (ADVENT's released ensemble: 0.5 / 0.5).
    weights: tuple[float, float] = (0.5, 0.5)


@dataclass
class RunsConfig:
    """Which variants run and how they depend on each other: the plain lists and mappings dvc.yaml's stages
    iterate (DVC can neither filter `variants` nor look a key up in them, so the wiring lives here)."""

    #: Stage train_source: source labels only, no target images, continued from the pretrained model.
    train_source: list[str]
    #: Stage adapt: source labels and target images, continued from the pretrained model.
    adapt: list[str]
    #: Stage oracle: the variant trained on target labels (the upper bound), for `oracle.steps`.
    oracle: str
    #: Stage evaluate: variants to score, each once: any trained variant or ensemble. The report shows them in
    #: `variants` order. A trained variant it leaves out must serve another run (a stage of a method).
    evaluate: list[str]
    #: Stage pseudo: pseudo-label set (a key of params `pseudo`) -> the trained variant whose models label the
    #: target train images, seed by seed.
    pseudo: dict[str, str] = field(default_factory=dict, metadata=_SELECTION)
    #: Stage round: variant -> its wiring; trained with `adapt`'s optimiser on a pseudo-label set.
    rounds: dict[str, RoundWiring] = field(default_factory=dict, metadata=_SELECTION)
    #: Stage ensemble: variant -> its two members, assembled (not trained) seed by seed.
    ensembles: dict[str, EnsembleWiring] = field(default_factory=dict, metadata=_SELECTION)
    #: Stage train_network: variant -> a network of params `networks` it trains on, from that network's
    #: source-only model (models/pretrain_<network>), with the network's optimiser for `adapt.steps` steps.
    networks: dict[str, str] = field(default_factory=dict, metadata=_SELECTION)

    @property
    def trained(self) -> list[str]:
        """Every variant some stage trains, in stage order."""
        return [*self.train_source, *self.adapt, self.oracle, *self.rounds, *self.networks]


@dataclass
class EvaluateConfig:
    batch_size: int = 8
    #: Target-val images shown in the qualitative figure, by position in the val list.
    samples: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    #: Also score every model on source val (shows the domain gap).
    source_val: bool = True
    #: For models evaluated with test-time aggregation, also score them without it (what aggregation adds).
    compare_without_tta: bool = True
    #: Val pairs (source image k, target image k) on which PLCA's cycles are scored with target labels
    #: (plca/evaluation/cycles.py, reports/cycles.md); 0 = off. Needs a source val split.
    cycle_pairs: int = 100
    #: Sec. 3.5's aggregation weight for a model scored with test-time aggregation whose method has no `alpha`
    #: option (a method with one, PLCA, aggregates at test time with the alpha it trains with).
    test_time_alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.test_time_alpha <= 1.0:
            raise ValueError(f"test_time_alpha must be in [0, 1], got {self.test_time_alpha}")


@dataclass
class Params:
    data: DataConfig
    model: DeepLabV2Config
    engine: EngineConfig
    pretrain: PretrainConfig
    adapt: PhaseConfig
    oracle: PhaseConfig
    #: Per method, the options every variant of it shares (a variant's own options override them).
    methods: dict[str, dict[str, Any]]
    variants: dict[str, VariantConfig]
    runs: RunsConfig
    report: ReportConfig
    seeds: list[int]
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    #: Pseudo-label sets a round can learn from (which run labels each: `runs.pseudo`).
    pseudo: dict[str, PseudoSetConfig] = field(default_factory=dict)
    #: The source's spatial prior that sets with `spatial_prior` apply (CBST-SP; the `spatial_prior` stage).
    spatial_prior: SpatialPriorConfig = field(default_factory=SpatialPriorConfig)
    #: Segmentation networks besides `model`, each with its own source-only pretraining (`runs.networks`: which
    #: variants train on them).
    networks: dict[str, NetworkConfig] = field(default_factory=dict, metadata=_SELECTION)
    #: Which setup this is: `embedded` (the default toy pair), `gta5` or `synthia` (the paper).
    profile: str = "embedded"

    def transform(self, domain: str) -> TransformConfig:
        """The training augmentation of a domain ("source" | "target")."""
        d = self.data
        return d.target_transform if domain == "target" and d.target_transform is not None else d.train_transform

    def variant(self, name: str) -> VariantConfig:
        if name not in self.variants:
            raise ConfigError(f"params.variants: no variant '{name}'; defined: {sorted(self.variants)}")
        return self.variants[name]

    def shared_options(self, method: str) -> dict[str, Any]:
        """The options every variant of `method` shares (params `methods.<method>`; none when it has no entry)."""
        return dict(self.methods.get(method, {}))

    def method_options(self, name: str) -> dict[str, Any]:
        """A variant's method options: its method's shared options, overridden by the variant's own options."""
        v = self.variant(name).train
        if v.method is None:
            raise ConfigError(f"params.variants.{name}.train: no method (an ensemble is assembled, not trained)")
        return {**self.shared_options(v.method), **v.options}

    def pretraining(self, run: str) -> PretrainConfig | None:
        """The pretraining `run` is (`pretrain`: params `pretrain`; `pretrain_<network>`: that network's), else
        None (a variant)."""
        if run == PRETRAINED:
            return self.pretrain
        network = self.network_of(run)
        return self.networks[network].pretrain if network is not None and run not in self.runs.networks else None

    def pretrain_options(self, pretrain: PretrainConfig | None = None) -> dict[str, Any]:
        """A pretraining's method options (default: params `pretrain`'s): its method's shared options, overridden
        by its own `options`."""
        p = pretrain or self.pretrain
        return {**self.shared_options(p.method), **p.options}

    def method_config(self, name: str) -> Any:
        """A variant's method options as its method's config dataclass (the method's defaults filled in)."""
        v = self.variant(name).train
        if v.method is not None and v.method not in METHODS:
            raise ConfigError(f"params.variants.{name}.train.method: unknown method '{v.method}'; "
                              f"known: {sorted(METHODS)}")
        if v.method is None:
            raise ConfigError(f"params.variants.{name}.train: no method (an ensemble is assembled, not trained)")
        return from_dict(METHODS[v.method][1], self.method_options(name),
                         f"params.methods.{v.method} + params.variants.{name}.train.options")

    def phase(self, name: str) -> PhaseConfig:
        """The phase (length and segmenter optimiser) a variant trains in: `oracle` for the oracle, `adapt`'s
        length with its network's optimiser for a variant on a network of `networks`, else `adapt`, unless the
        variant has a `phase` of its own; its learning rate times the variant's `lr_scale`."""
        train = self.variants[name].train if name in self.variants else None
        if train is not None and train.phase is not None:
            phase = train.phase
        elif name == self.runs.oracle:
            phase = self.oracle
        elif name in self.runs.networks:
            phase = PhaseConfig(steps=self.adapt.steps, optim=self.networks[self.runs.networks[name]].optim)
        else:
            phase = self.adapt
        scale = 1.0 if train is None else train.lr_scale
        return phase if scale == 1.0 else replace(phase, optim=replace(phase.optim, lr=phase.optim.lr * scale))

    def network_of(self, run: str) -> str | None:
        """The network of `networks` a run trains (`pretrain_<network>` or a variant of runs.networks); None for
        params `model`."""
        if run.startswith(NETWORK_PRETRAIN) and run[len(NETWORK_PRETRAIN):] in self.networks:
            return run[len(NETWORK_PRETRAIN):]
        return self.runs.networks.get(run)

    def network_options(self, run: str) -> tuple[str, Any]:
        """(architecture, validated options) of the network a run trains."""
        network = self.network_of(run)
        if network is None:
            return DEFAULT_ARCH, self.model
        net = self.networks[network]
        return net.arch, network_config(net.arch, net.model, f"params.networks.{network}.model")

    def steps(self, name: str) -> int:
        """A variant's optimiser steps: its phase's, divided by its `steps_split`."""
        return self.phase(name).steps // self.variant(name).train.steps_split

    def test_time_alpha(self, name: str) -> float:
        """Sec. 3.5's aggregation weight when `name` is scored with test-time aggregation: the `alpha` its method
        trains with when the method has that option (PLCA: `methods.plca.alpha` or the variant's own), else
        `evaluate.test_time_alpha`. dvc.yaml's evaluate stage depends on `methods` and `evaluate` for it."""
        if self.variant(name).train.method is None:
            return self.evaluate.test_time_alpha
        alpha = getattr(self.method_config(name), "alpha", None)
        return self.evaluate.test_time_alpha if alpha is None else float(alpha)

    def lineage(self, name: str) -> tuple[set[str], set[str]]:
        """(the variants whose training `name`'s model depends on, itself included; the pseudo-label sets it
        learns from, directly or through them): a round's starting model and its set's labeller, an ensemble's
        members."""
        r = self.runs
        variants: set[str] = set()
        sets: set[str] = set()
        todo = [name]
        while todo:
            v = todo.pop()
            if v in variants or v == PRETRAINED:
                continue
            variants.add(v)
            if v in r.rounds:
                sets.add(r.rounds[v].pseudo)
                todo += [r.rounds[v].init, r.pseudo.get(r.rounds[v].pseudo, PRETRAINED)]
            if v in r.ensembles:
                todo += list(r.ensembles[v].members)
        return variants, sets

    @property
    def all_variants(self) -> list[str]:
        """Every variant that runs (`runs.evaluate`)."""
        return list(self.runs.evaluate)


_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


def _check_wiring(p: Params) -> None:
    """Pseudo-label sets, rounds and ensembles: each names what exists and runs, with nothing circular."""
    r = p.runs
    trained = r.trained
    for key, model in r.pseudo.items():
        if key not in p.pseudo:
            raise ConfigError(f"params.runs.pseudo.{key}: no pseudo-label set '{key}' in params.pseudo; "
                              f"defined: {sorted(p.pseudo)}")
        if model not in trained and model != PRETRAINED:
            raise ConfigError(f"params.runs.pseudo.{key}: '{model}' is neither '{PRETRAINED}' nor a trained variant "
                              f"of runs; trained: {trained}")
    for name, wiring in r.rounds.items():
        where = f"params.runs.rounds.{name}"
        if wiring.init != PRETRAINED and wiring.init not in trained:
            raise ConfigError(f"{where}.init: expected 'pretrain' or a trained variant of runs, got "
                              f"'{wiring.init}'; trained: {trained}")
        if wiring.init in r.networks:  # a round builds params `model`; rounds on other networks are not wired
            raise ConfigError(f"{where}.init: '{wiring.init}' trains on network '{r.networks[wiring.init]}' "
                              "(runs.networks); a round starts from 'pretrain' or a variant of params `model`")
        if wiring.pseudo not in r.pseudo:
            raise ConfigError(f"{where}.pseudo: '{wiring.pseudo}' is not a set of runs.pseudo "
                              f"({sorted(r.pseudo)})")
        if p.variant(name).train.labelled not in ("pseudo", "source"):
            raise ConfigError(f"params.variants.{name}.train.labelled: a round learns from its set's labelled "
                              "images as its source ('pseudo', IntraDA) or beside the source labels ('source', "
                              "self-training), not from target labels")
    for name in trained:
        if name not in r.rounds and p.variant(name).train.labelled == "pseudo":
            raise ConfigError(f"params.variants.{name}.train.labelled: 'pseudo' needs the variant's wiring in "
                              "runs.rounds (its starting model and pseudo-label set)")
    # every run's upstream runs, to refuse a cycle before DVC does
    upstream: dict[str, set[str]] = {name: set() for name in trained}
    for name, wiring in r.rounds.items():
        upstream[name] |= {wiring.init, r.pseudo[wiring.pseudo]} - {PRETRAINED}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise ConfigError(f"params.runs.rounds: circular wiring {' -> '.join([*path, name])}")
        if state.get(name) != 2:
            state[name] = 1
            for up in sorted(upstream.get(name, ())):
                visit(up, [*path, name])
            state[name] = 2

    for name in trained:
        visit(name, [])
    for name, wiring in r.ensembles.items():
        where = f"params.runs.ensembles.{name}"
        if p.variant(name).train.method is not None:
            raise ConfigError(f"params.variants.{name}.train.method must be null for an ensemble (runs.ensembles): "
                              "it is assembled from its members, not trained")
        for member in wiring.members:
            if member not in trained:
                raise ConfigError(f"{where}.members: '{member}' is not a trained variant of runs; trained: {trained}")
        if any(w <= 0 for w in wiring.weights):
            raise ConfigError(f"{where}.weights: expected positive weights, got {list(wiring.weights)}")
        if p.variant(name).train.test_time_aggregation:
            raise ConfigError(f"params.variants.{name}.train.test_time_aggregation: an ensemble averages logits; "
                              "it has no test-time aggregation")


def _check_runs(p: Params) -> None:
    r = p.runs
    trained = r.trained
    named = [*trained, *r.ensembles]
    for key in (f.name for f in fields(r)):
        value = getattr(r, key)
        names = [value] if isinstance(value, str) else list(value.values() if key == "pseudo" else value)
        for name in names:
            if key == "pseudo" and name == PRETRAINED:  # the shared source-only model labels too
                continue
            if name not in p.variants:
                raise ConfigError(f"params.runs.{key}: no variant '{name}'; defined: {sorted(p.variants)}")
    for reserved in (PRETRAINED, PSEUDO_METRICS, *(NETWORK_PRETRAIN + n for n in p.networks)):
        if reserved in p.variants:
            raise ConfigError(f"params.variants.{reserved}: a reserved name (models/{PRETRAINED}, "
                              f"metrics/{PSEUDO_METRICS}, models/{NETWORK_PRETRAIN}<network>); rename the variant")
    for name, network in r.networks.items():
        if network not in p.networks:
            raise ConfigError(f"params.runs.networks.{name}: no network '{network}' in params.networks; "
                              f"defined: {sorted(p.networks)}")
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise ConfigError(f"params.runs: {twice} listed by more than one of train_source, adapt, oracle, rounds, "
                          "ensembles (each variant is made by one stage)")
    dups = sorted({n for n in r.evaluate if r.evaluate.count(n) > 1})
    if dups:
        raise ConfigError(f"params.runs.evaluate: {dups} listed twice")
    for name in r.evaluate:
        if name not in named:
            raise ConfigError(f"params.runs.evaluate: '{name}' is neither trained nor assembled by runs (train_source, "
                              "adapt, oracle, rounds, ensembles)")
    for name in p.variants:
        if p.variant(name).train.method is None and name in trained:
            raise ConfigError(f"params.variants.{name}.train.method: null, but runs trains it (null is for "
                              "ensembles)")
    _check_wiring(p)
    used = {*r.pseudo.values(), *(w.init for w in r.rounds.values()),
            *(m for w in r.ensembles.values() for m in w.members)}
    for name in named:
        if name not in r.evaluate and name not in used:
            raise ConfigError(f"params.runs.evaluate: '{name}' runs but is neither evaluated nor used by another run "
                              "(add it to runs.evaluate)")
    for name in trained:
        v = p.variant(name).train
        if v.steps_split < 1 or p.phase(name).steps % v.steps_split:
            splits = sorted({p.variant(n).train.steps_split for n in trained})
            raise ConfigError(f"params.variants.{name}.train.steps_split: {v.steps_split} does not divide its "
                              f"phase's steps ({p.phase(name).steps}) into equal parts; the runs split their "
                              f"steps by {splits}: give the phase a multiple of {math.lcm(*splits)} steps")
    for name in r.train_source:
        method = p.variant(name).train.method
        if "target" in METHODS[method][0].streams:
            raise ConfigError(f"params.runs.train_source: '{name}' trains on target images (method '{method}'); "
                              "list it under runs.adapt")
    if p.variant(r.oracle).train.labelled != "target":
        raise ConfigError(f"params.variants.{r.oracle}.train.labelled must be 'target' for the oracle (runs.oracle)")


def _check_show(p: Params) -> None:
    colours: dict[str, str] = {}
    for name, v in p.variants.items():
        where = f"params.variants.{name}.show"
        if len(set(v.show.tables)) != len(v.show.tables):
            raise ConfigError(f"{where}.tables: {v.show.tables} names a table twice; tables: {list(TABLES)}")
        if v.show.colour is not None:
            if not _COLOUR.fullmatch(v.show.colour):
                raise ConfigError(f"{where}.colour: expected '#rrggbb', got {v.show.colour!r}")
            other = colours.setdefault(v.show.colour.lower(), name)
            if other != name:  # a figure must never draw two variants alike
                raise ConfigError(f"{where}.colour: {v.show.colour} is variants.{other}'s colour too")
    for name, v in p.variants.items():
        if v.show.baseline is not None and (v.show.baseline not in p.variants or v.show.baseline == name):
            raise ConfigError(f"params.variants.{name}.show.baseline: expected another defined variant, got "
                              f"'{v.show.baseline}'")
    roles = p.report
    named = [("baseline", roles.baseline), ("headline", roles.headline), ("control", roles.control)]
    named += [(f"qualitative[{i}]", n) for i, n in enumerate(roles.qualitative)]
    named += [(f"class_iou[{i}]", n) for i, n in enumerate(roles.class_iou)]
    for key, name in named:
        if name is not None and name not in p.variants:
            raise ConfigError(f"params.report.{key}: no variant '{name}'; defined: {sorted(p.variants)}")
    if roles.headline == roles.baseline:
        raise ConfigError(f"params.report.headline: '{roles.headline}' is the baseline; the headline compares "
                          "another variant with it")
    for key in ("qualitative", "class_iou"):
        names = getattr(roles, key)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"params.report.{key}: expected distinct variants, at least one, got {names}")


def _check(p: Params) -> None:
    for method in p.methods:
        if method not in METHODS:
            raise ConfigError(f"params.methods.{method}: unknown method; known: {sorted(METHODS)}")
    # every defined variant's method and options now, not when it is first run: a typo stops every stage at once
    for name in p.variants:
        if p.variant(name).train.method is not None:
            p.method_config(name)
    if p.pretrain.method not in METHODS:
        raise ConfigError(f"params.pretrain.method: unknown method '{p.pretrain.method}'; known: {sorted(METHODS)}")
    if p.pretrain.method not in p.methods:
        # dvc.yaml's pretrain stage depends on methods.${pretrain.method}: DVC stops on a missing key
        raise ConfigError(f"params.methods: no entry for pretrain.method '{p.pretrain.method}' (`{{}}` when it "
                          "shares no options)")
    from_dict(METHODS[p.pretrain.method][1], p.pretrain_options(),
              f"params.methods.{p.pretrain.method} + params.pretrain.options")
    for name, net in p.networks.items():
        where = f"params.networks.{name}"
        if net.arch not in ARCHS:
            raise ConfigError(f"{where}.arch: unknown architecture '{net.arch}'; known: {sorted(ARCHS)}")
        if net.arch == DEFAULT_ARCH:
            raise ConfigError(f"{where}.arch: '{DEFAULT_ARCH}' is params `model`; a network here is another one")
        network_config(net.arch, net.model, f"{where}.model")
        method = net.pretrain.method
        if method not in METHODS or method not in p.methods:
            raise ConfigError(f"{where}.pretrain.method: '{method}' must be a known method with an entry in "
                              f"params.methods (`{{}}` when it shares none); known: {sorted(METHODS)}")
        from_dict(METHODS[method][1], p.pretrain_options(net.pretrain),
                  f"params.methods.{method} + {where}.pretrain.options")
    for name, ps in p.pseudo.items():
        if ps.policy not in POLICIES:
            raise ConfigError(f"params.pseudo.{name}.policy: unknown policy '{ps.policy}'; known: {sorted(POLICIES)}")
        try:
            from_dict(POLICIES[ps.policy][1], ps.options, f"params.pseudo.{name}.options")
        except (TypeError, ValueError) as exc:  # the policy config's own checks (__post_init__)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"params.pseudo.{name}.options: {exc}") from None
        if ps.spatial_prior and not POLICIES[ps.policy][0].takes_prior:
            raise ConfigError(f"params.pseudo.{name}.spatial_prior: policy '{ps.policy}' takes no spatial prior; "
                              f"those that do: {sorted(k for k, (c, _) in POLICIES.items() if c.takes_prior)}")
    _check_runs(p)
    _check_show(p)
    tt, st = p.data.target_transform, p.data.train_transform
    if tt is not None and (tt.mean, tt.std, tt.channel_order, tt.scale) != (st.mean, st.std, st.channel_order,
                                                                           st.scale):
        raise ConfigError("params.data.target_transform: its normalisation (mean, std, channel_order, scale) must "
                          "be train_transform's: one model reads both domains, and evaluation normalises as "
                          "train_transform")
    if p.evaluate.cycle_pairs < 0:
        raise ConfigError(f"params.evaluate.cycle_pairs: expected 0 (off) or a number of val pairs, got "
                          f"{p.evaluate.cycle_pairs}")
    if len(set(p.seeds)) != len(p.seeds) or not p.seeds or min(p.seeds) < 0:
        raise ConfigError(f"params.seeds: expected distinct seeds >= 0, got {p.seeds}")


def validate_params(raw: dict[str, Any], where: str) -> Params:
    """Validate a params mapping (a parsed params file, or profiles merged by plca.profiles); errors start with
    `where` and name the key."""
    try:
        params = from_dict(Params, raw, "params")
        _check(params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:  # __post_init__ checks of a section's dataclass
        raise ConfigError(f"{where}: {exc}") from None
    return params


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the file and the key."""
    return validate_params(load_yaml(path), str(path))
