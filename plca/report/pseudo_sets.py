"""reports/pseudo_labels.md and figures/pseudo_labels.png: the pseudo-label sets rounds learn from.

The pseudo stage (stages/pseudo.py) writes, per set of params `runs.pseudo` and seed, the set's summary
`metrics/pseudo/<set>/s<seed>.json` and the pseudo-labels of its first labelled images in name order
`metrics/pseudo/<set>/s<seed>/<image name>.png`; this module averages the summaries over seeds and lays them out,
and picks the images the figure shows. Precision and coverage are scored with target train labels: a diagnostic of
the labelling, never a training signal and never a result table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plca.report import atomic_write_text
from plca.report.tables import NA, ResultsError, _markdown, _mean_std, _std, _Table

if TYPE_CHECKING:  # the schema lives with the params; the report reads only the fields named here
    from plca.labelling import PseudoSetConfig
    from plca.params import RoundWiring

#: Title of pseudo_labels.md.
HEADING = "Pseudo-label sets (a diagnostic)"


@dataclass(frozen=True)
class PseudoSet:
    """One set of `runs.pseudo`, as the report shows it."""

    name: str
    #: The run whose models labelled it, seed by seed (`runs.pseudo.<name>`: `pretrain` or a trained variant).
    labeller: str
    #: Its config's policy and options (params `pseudo.<name>`).
    policy: str
    options: Mapping[str, Any]
    #: The rounds (`runs.rounds`) that learn from it, in params order.
    rounds: tuple[str, ...]


def describe_sets(
    pseudo: Mapping[str, str], configs: Mapping[str, PseudoSetConfig], rounds: Mapping[str, RoundWiring]
) -> list[PseudoSet]:
    """The sets of `pseudo` (params `runs.pseudo`: set -> labeller), in its order, with their config's policy and
    options (`configs`: params `pseudo`) and the rounds of `rounds` (params `runs.rounds`) that learn from each."""
    sets = []
    for name, labeller in pseudo.items():
        if name not in configs:
            raise ValueError(f"runs.pseudo.{name}: no pseudo-label set '{name}' in params.pseudo; "
                             f"defined: {sorted(configs)}")
        cfg = configs[name]
        sets.append(PseudoSet(name=name, labeller=labeller, policy=cfg.policy, options=dict(cfg.options),
                              rounds=tuple(r for r, wiring in rounds.items() if wiring.pseudo == name)))
    return sets


def summary_path(pseudo_dir: Path, name: str, seed: int) -> Path:
    return Path(pseudo_dir) / name / f"s{seed}.json"


def samples_dir(pseudo_dir: Path, name: str, seed: int) -> Path:
    return Path(pseudo_dir) / name / f"s{seed}"


def load_summaries(pseudo_dir: Path, sets: Sequence[PseudoSet], seeds: Sequence[int]) -> dict[str, dict[int, dict]]:
    """{set: {seed: summary}} of every set and seed; a missing file raises FileNotFoundError naming it, a summary
    of another policy than the set's config (stale metrics) ValueError naming it."""
    out: dict[str, dict[int, dict]] = {}
    for s in sets:
        out[s.name] = {}
        for seed in seeds:
            path = summary_path(pseudo_dir, s.name, seed)
            try:
                summary = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: summary of pseudo-label set '{s.name}' seed {seed} is missing "
                                        f"(did its pseudo stage, pseudo@{s.name}, run?)") from None
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(summary, dict):
                raise ResultsError(f"{path}: a pseudo-label summary is a JSON object, got {type(summary).__name__}")
            if summary.get("policy") != s.policy:
                raise ResultsError(f"{path}: written by policy {summary.get('policy')!r} but params.pseudo.{s.name} "
                                   f"has policy '{s.policy}' (stale metrics: rerun pseudo@{s.name})")
            out[s.name][seed] = summary
    return out


def _share(summary: Mapping[str, Any], key: str, where: Path | str) -> float | None:
    value = summary.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ResultsError(f"{where}: '{key}' must be a share in [0, 1] or null, got {value!r}")
    return float(value)


def _count(summary: Mapping[str, Any], key: str, where: Path | str) -> int:
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ResultsError(f"{where}: '{key}' must be a count of images, got {value!r}")
    return value


def _percent(values: Sequence[float | None], n_seeds: int) -> str:
    """Mean ± std (ddof=1) in % over the seeds that have a value; the count when some seeds have none."""
    have = np.array([100.0 * v for v in values if v is not None], dtype=float)
    if not len(have):
        return NA
    text = _mean_std(float(have.mean()), _std(have))
    return text if len(have) == n_seeds else f"{text} (n={len(have)})"


def _mean_count(values: Sequence[int]) -> str:
    mean = sum(values) / len(values)
    return str(int(mean)) if float(mean).is_integer() else f"{mean:.1f}"


def _options(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items())


def pseudo_table_markdown(
    sets: Sequence[PseudoSet],
    summaries: Mapping[str, Mapping[int, Mapping[str, Any]]],
    *,
    dataset_label: str,
    label: Callable[[str], str] = str,
    pseudo_dir: Path | str = "metrics/pseudo",
) -> str:
    """One row per set (in `sets` order): labeller, policy and options, rounds learning from it, n seeds, images
    labelled / total and coverage and precision in %, mean ± std over the seeds of `summaries[set]`. label: how a
    run is named (the report's variant labels). A page saying so when no set ran."""
    if not sets:
        return _markdown([], HEADING, [
            f"No pseudo-label set ran on **{dataset_label}**: params `runs.pseudo` is empty, so no round learns "
            "from pseudo-labels."])
    header = ["set", "labelled by", "policy (options)", "rounds learning from it", "n seeds",
              "images labelled / total", "coverage (%)", "precision (%)"]
    rows = []
    seeds: set[int] = set()
    for s in sets:
        runs = summaries[s.name]
        seeds.update(runs)
        where = {seed: summary_path(Path(pseudo_dir), s.name, seed) for seed in runs}
        labelled = [_count(m, "labelled", where[seed]) for seed, m in runs.items()]
        images = [_count(m, "images", where[seed]) for seed, m in runs.items()]
        coverage = [_share(m, "coverage", where[seed]) for seed, m in runs.items()]
        precision = [_share(m, "precision", where[seed]) for seed, m in runs.items()]
        options = _options(s.options)
        rows.append([
            s.name,
            label(s.labeller),
            s.policy + (f" ({options})" if options else ""),
            ", ".join(map(label, s.rounds)) or NA,
            str(len(runs)),
            f"{_mean_count(labelled)} / {_mean_count(images)}" if runs else NA,
            _percent(coverage, len(runs)),
            _percent(precision, len(runs)),
        ])
    intro = [
        f"Pseudo-labels of **{dataset_label}**'s target train images, one row per set of params `runs.pseudo` (in "
        f"its order), each labelled seed by seed by the models of the run in `labelled by`, as its policy (params "
        "`pseudo.<set>`) decides; the rounds of `runs.rounds` listed train on it.",
        "precision: the share of pseudo-labelled pixels that agree with the target train ground truth. coverage: "
        "the share of the labelled images' ground-truth pixels that got a pseudo-label.",
        "A diagnostic: target train labels only score the pseudo-labels here, they never train. "
        f"{NA}: not scored (the dataset has no target train labels, `pseudo.<set>.precision` is false, or no pixel "
        "got a label).",
        f"Mean ± std over seeds {', '.join(map(str, sorted(seeds)))} (std with ddof=1); images labelled / total: mean "
        "over seeds; (n=k): only k seeds scored. Source: metrics/pseudo/<set>/s<seed>.json (the pseudo stage).",
    ]
    return _markdown([_Table("", [], header, rows, "llllrrrr")], HEADING, intro)


def write_pseudo_table(
    sets: Sequence[PseudoSet],
    summaries: Mapping[str, Mapping[int, Mapping[str, Any]]],
    path: Path | str,
    *,
    dataset_label: str,
    label: Callable[[str], str] = str,
    pseudo_dir: Path | str = "metrics/pseudo",
) -> Path:
    """Write pseudo_labels.md atomically."""
    return atomic_write_text(path, pseudo_table_markdown(sets, summaries, dataset_label=dataset_label, label=label,
                                                         pseudo_dir=pseudo_dir))


def sample_labels(pseudo_dir: Path, name: str, seed: int, limit: int, labelled: int) -> list[Path]:
    """The first `limit` pseudo-label PNGs the pseudo stage kept of a set and seed, in name order. Its folder
    missing raises FileNotFoundError naming it, unless the set labelled no image (`labelled`, from its summary:
    git keeps no empty folder)."""
    folder = samples_dir(pseudo_dir, name, seed)
    if not folder.is_dir() and labelled == 0:
        return []
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: sample pseudo-labels of set '{name}' seed {seed} are missing "
                                f"(did its pseudo stage, pseudo@{name}, run?)")
    return sorted(folder.glob("*.png"), key=lambda p: p.stem)[:limit]
