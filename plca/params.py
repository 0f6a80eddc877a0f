"""The typed form of params.yaml: one dataclass per section, validated at stage start.

An unknown key, a missing key or a wrong type stops the stage with an error that names the key
(see `plca.config.from_dict`). Cross-section checks (every Table 1 variant defined, methods known) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plca.config import ConfigError, from_dict, load_yaml
from plca.data.embedded import EmbeddedConfig
from plca.data.prepare import RealDataConfig
from plca.data.transforms import TransformConfig
from plca.engine.optim import OptimConfig
from plca.engine.tracking import TrackingConfig
from plca.engine.trainer import EngineConfig
from plca.methods import METHODS
from plca.methods.plca import PLCAConfig
from plca.models.deeplabv2 import DeepLabV2Config


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


@dataclass
class PretrainConfig(PhaseConfig):
    """Source-only pretraining that every variant starts from (same seed): its method and options."""

    method: str = "source_only"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantConfig:
    """One row of Table 1."""

    method: str
    #: Which labelled stream trains it: the source domain, or the target's own labels (the oracle).
    labelled: Literal["source", "target"] = "source"
    #: Start from the source-only pretrained model of the same seed, or from the model's initialisation.
    init: Literal["pretrain", "scratch"] = "pretrain"
    #: Test-time aggregation of features then probabilities (Sec. 3.5); on for PLCA models.
    test_time_aggregation: bool = False
    #: Method options; the method's shared section (e.g. `plca`) supplies the rest.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table1Config:
    #: Every variant in report order (evaluated and reported); it must be exactly the three groups below.
    variants: list[str]
    #: Variants trained by the source-only stage, by the adaptation stage, and the oracle.
    source_variants: list[str]
    adapt_variants: list[str]
    oracle_variant: str = "oracle"


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


@dataclass
class Params:
    data: DataConfig
    model: DeepLabV2Config
    engine: EngineConfig
    pretrain: PretrainConfig
    adapt: PhaseConfig
    oracle: PhaseConfig
    source_only: dict[str, Any]
    plca: dict[str, Any]
    variants: dict[str, VariantConfig]
    table1: Table1Config
    seeds: list[int]
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    #: Which setup this is: `embedded` (the default toy pair), `gta5` or `synthia` (the paper).
    profile: str = "embedded"

    def variant(self, name: str) -> VariantConfig:
        if name not in self.variants:
            raise ConfigError(f"params.variants: no variant '{name}'; defined: {sorted(self.variants)}")
        return self.variants[name]

    def shared_options(self, method: str) -> dict[str, Any]:
        """The options every variant of `method` shares (params `source_only:` or `plca:`; none for others)."""
        return dict({"source_only": self.source_only, "plca": self.plca}.get(method, {}))

    def method_options(self, name: str) -> dict[str, Any]:
        """A variant's method options: the method's shared section, overridden by the variant's own options."""
        v = self.variant(name)
        return {**self.shared_options(v.method), **v.options}

    def test_time_alpha(self, name: str) -> float:
        """Sec. 3.5's aggregation weight when `name` is scored with test-time aggregation: the variant's own alpha
        (its options, then `plca.alpha`), so a source-only model scored this way follows `plca.alpha` too."""
        return float(self.method_options(name).get("alpha", self.plca.get("alpha", PLCAConfig.alpha)))

    @property
    def all_variants(self) -> list[str]:
        return list(self.table1.variants)


def _check(p: Params) -> None:
    t = p.table1
    groups = [*t.source_variants, *t.adapt_variants, t.oracle_variant]
    if sorted(groups) != sorted(t.variants) or len(set(t.variants)) != len(t.variants):
        raise ConfigError(f"params.table1.variants {t.variants} must list each of source_variants, adapt_variants "
                          f"and oracle_variant exactly once ({groups})")
    for name in p.all_variants:
        v = p.variant(name)
        if v.method not in METHODS:
            raise ConfigError(f"params.variants.{name}.method: unknown method '{v.method}'; known: {sorted(METHODS)}")
        # the method's options now, not at training time: a typo in `plca:` stops every stage at once
        from_dict(METHODS[v.method][1], p.method_options(name), f"params.{v.method} + params.variants.{name}.options")
    if p.pretrain.method not in METHODS:
        raise ConfigError(f"params.pretrain.method: unknown method '{p.pretrain.method}'")
    for name in p.table1.source_variants:
        if p.variant(name).method != "source_only":
            raise ConfigError(f"params.table1.source_variants: '{name}' is not a source_only variant")
    if p.variant(p.table1.oracle_variant).labelled != "target":
        raise ConfigError(f"params.variants.{p.table1.oracle_variant}.labelled must be 'target' for the oracle")
    if p.evaluate.cycle_pairs < 0:
        raise ConfigError(f"params.evaluate.cycle_pairs: expected 0 (off) or a number of val pairs, got "
                          f"{p.evaluate.cycle_pairs}")
    if len(set(p.seeds)) != len(p.seeds) or not p.seeds:
        raise ConfigError(f"params.seeds: expected distinct seeds, got {p.seeds}")


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the file and the key."""
    raw = load_yaml(path)
    try:
        params = from_dict(Params, raw, "params")
        _check(params)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:  # __post_init__ checks of a section's dataclass
        raise ConfigError(f"{path}: {exc}") from None
    return params
