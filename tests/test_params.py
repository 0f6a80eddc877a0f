"""plca.params: cross-section rules of params.yaml, and a variant's identity living in params alone."""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from plca.config import ConfigError
from plca.params import load_params, validate_params
from plca.report.config import Presentation
from plca.report.paper import TABLE1_COLUMNS

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def _params(edit: Callable[[dict[str, Any]], None]) -> Any:
    raw = copy.deepcopy(RAW)
    edit(raw)
    return validate_params(raw, "p.yaml")


def _error(edit: Callable[[dict[str, Any]], None]) -> str:
    with pytest.raises(ConfigError) as err:
        _params(edit)
    return str(err.value)


def test_test_time_alpha_is_the_alpha_the_method_trains_with_else_evaluates_with(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["methods"]["plca"]["alpha"] = 0.3
    raw["evaluate"]["test_time_alpha"] = 0.7
    raw["variants"]["source_only"]["train"]["test_time_aggregation"] = True  # a source-only model scored so
    raw["variants"]["fass"]["train"]["options"]["alpha"] = 0.2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    assert params.test_time_alpha("plca") == 0.3  # methods.plca.alpha
    assert params.test_time_alpha("fass") == 0.2  # the variant's own
    assert params.test_time_alpha("source_only") == 0.7  # its method has no alpha: evaluate.test_time_alpha
    del raw["methods"]["plca"]["alpha"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_params(path).test_time_alpha("plca") == 0.5  # PLCA's own default, not evaluate's 0.7


def test_the_default_aggregates_every_aggregated_variant_with_the_papers_alpha() -> None:
    params = load_params(REPO / "params.yaml")
    aggregated = [v for v in params.variants if params.variant(v).train.test_time_aggregation]
    assert "plca_no_sagg" in aggregated and all(params.test_time_alpha(v) == 0.5 for v in aggregated)


def test_shared_options_come_from_the_methods_section_under_the_variants_own() -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["methods"]["plca"].update(tau=5.0)
        del raw["methods"]["minent"]

    params = _params(edit)
    assert params.method_options("plca")["tau"] == 5.0 and params.method_options("fass")["cass"] is False
    assert params.shared_options("minent") == {}  # a method without an entry shares nothing


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["variants"]["plca"]["show"].update(lable="x"), "params.variants.plca.show: unknown key(s)"),
        (lambda r: r["variants"]["plca"]["show"].update(tables=["table3"]), "params.variants.plca.show.tables[0]"),
        (lambda r: r["variants"]["plca"]["show"].update(colour="purple"), "params.variants.plca.show.colour"),
        (lambda r: r["variants"]["plca"]["show"].update(colour="#2CA02C"), "variants.fass's colour too"),
        (lambda r: r["variants"]["plca"]["train"].update(alpah=0.3), "params.variants.plca.train: unknown key"),
        (lambda r: r["methods"]["plca"].update(alpah=0.3), "params.methods.plca + params.variants.fass.train.options"),
        (lambda r: r["methods"].update(nope={}), "params.methods.nope: unknown method"),
        (lambda r: r["variants"]["minent"]["train"].update(method="nope"), "params.variants.minent.train.method"),
        (lambda r: r["pretrain"].pop("method"), "params.pretrain: missing required key 'method'"),
        (lambda r: r["methods"].pop("source_only"), "params.methods: no entry for pretrain.method 'source_only'"),
        (lambda r: r["runs"].update(oracle="source_only"), "params.runs: ['source_only'] listed by more than one"),
        (lambda r: r["runs"]["evaluate"].remove("fass"), "params.runs.evaluate: 'fass' runs but is neither evaluated"),
        (lambda r: r["runs"]["pseudo"].update(intrada_rank="advent_minent"),
         "params.runs.pseudo.intrada_rank: 'advent_minent' is neither 'pretrain' nor a trained variant"),
        (lambda r: r["runs"]["pseudo"].update(nope="advent"), "params.runs.pseudo.nope: no pseudo-label set 'nope'"),
        (lambda r: r["runs"]["rounds"]["intrada"].update(init="nope"), "params.runs.rounds.intrada.init"),
        (lambda r: r["runs"]["rounds"]["intrada"].update(pseudo="intrada_rank_rare"),
         "params.runs.rounds.intrada.pseudo: 'intrada_rank_rare' is not a set of runs.pseudo"),
        (lambda r: r["runs"]["rounds"].update(intrada={"init": "intrada", "pseudo": "intrada_rank"}),
         "params.runs.rounds: circular wiring intrada -> intrada"),
        (lambda r: r["runs"]["pseudo"].update(intrada_rank="intrada"), "circular wiring"),
        (lambda r: r["variants"]["intrada"]["train"].update(labelled="target"),
         "params.variants.intrada.train.labelled: a round learns from its set's labelled images"),
        (lambda r: r["variants"].update(pseudo=r["variants"]["fass"]), "params.variants.pseudo: a reserved name"),
        (lambda r: r["variants"]["intrada_s1"]["train"].update(labelled="pseudo"),
         "params.variants.intrada_s1.train.labelled: 'pseudo' needs the variant's wiring in runs.rounds"),
        (lambda r: r["variants"]["intrada_s1"]["train"].update(steps_split=4),
         "params.variants.intrada_s1.train.steps_split: 4 does not divide its phase's steps (150)"),
        (lambda r: r["runs"]["ensembles"]["advent_minent"].update(members=["advent", "intrada_rare"]),
         "params.runs.ensembles.advent_minent.members: 'intrada_rare' is not a trained variant"),
        (lambda r: r["runs"]["ensembles"]["advent_minent"].update(members=["advent"]),
         "params.runs.ensembles.advent_minent.members: expected 2 items"),
        (lambda r: r["variants"]["advent_minent"]["train"].update(method="advent"),
         "params.variants.advent_minent.train.method must be null for an ensemble"),
        (lambda r: r["runs"]["adapt"].append("intrada_rare") or r["runs"]["evaluate"].append("intrada_rare")
         or r["variants"]["intrada_rare"].update(train={}), "intrada_rare.train.method: null, but runs trains it"),
        (lambda r: r["pseudo"]["intrada_rank"].update(policy="nope"), "params.pseudo.intrada_rank.policy: unknown"),
        (lambda r: r["pseudo"]["intrada_rank"]["options"].update(ratio=1.5), "params.pseudo.intrada_rank.options"),
        (lambda r: r["runs"]["adapt"].append("nope") or r["runs"]["evaluate"].append("nope"),
         "params.runs.adapt: no variant 'nope'"),
        (lambda r: r["runs"]["train_source"].append("fass") or r["runs"]["adapt"].remove("fass"),
         "params.runs.train_source: 'fass' trains on target images"),
        (lambda r: r["runs"].update(oracle="ce_only", train_source=["source_only"]) or r["runs"].update(
            evaluate=[n for n in r["runs"]["evaluate"] if n != "oracle"]), "params.variants.ce_only.train.labelled"),
        (lambda r: r["report"].update(baseline="nope"), "params.report.baseline: no variant 'nope'"),
        (lambda r: r["report"]["class_iou"].append("nope"), "params.report.class_iou[3]: no variant 'nope'"),
        (lambda r: r["report"].update(control="nope"), "params.report.control: no variant 'nope'"),
        (lambda r: r["report"].update(headline="source_only"), "params.report.headline: 'source_only' is the baseline"),
        (lambda r: r["report"].update(qualitative=[]), "params.report.qualitative: expected distinct variants"),
        (lambda r: r.update(table1={}), "params: unknown key(s) ['table1']"),
        (lambda r: r["networks"]["mit"].update(arch="vit"), "params.networks.mit.arch: unknown architecture 'vit'"),
        (lambda r: r["networks"]["mit"].update(arch="deeplabv2"), "params.networks.mit.arch: 'deeplabv2' is params"),
        (lambda r: r["networks"]["mit"]["model"].update(widths=[1]), "params.networks.mit.model: unknown key(s)"),
        (lambda r: r["networks"]["mit"]["model"].update(depths=[1, 1]), "params.networks.mit.model"),
        (lambda r: r["networks"]["mit"]["pretrain"]["options"].update(lovas=True),
         "params.methods.source_only + params.networks.mit.pretrain.options: unknown key(s) ['lovas']"),
        (lambda r: r["networks"]["mit"]["pretrain"].update(method="nope"), "params.networks.mit.pretrain.method"),
        (lambda r: r["runs"]["networks"].update(daformer="vit"), "params.runs.networks.daformer: no network 'vit'"),
        (lambda r: r["variants"].update(pretrain_mit=r["variants"]["fass"]),
         "params.variants.pretrain_mit: a reserved"),
        (lambda r: r["runs"]["rounds"]["cbst_r1"].update(init="daformer"),
         "params.runs.rounds.cbst_r1.init: 'daformer' trains on network 'mit'"),
        (lambda r: r["variants"]["pgpc"]["show"].update(baseline="nope"),
         "params.variants.pgpc.show.baseline: expected another defined variant, got 'nope'"),
        (lambda r: r["methods"]["daformer"]["rcs"].update(temperature=0),
         "params.methods.daformer + params.variants.daformer.train.options"),
    ],
)
def test_bad_params_stop_with_the_key(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    assert message in _error(edit)


def test_every_paper_column_a_variant_names_is_the_papers_and_a_wrong_one_is_named() -> None:
    params = load_params(REPO / "params.yaml")
    named = {v.show.paper for v in params.variants.values()} - {None}
    assert named == set(TABLE1_COLUMNS)  # every column of the paper's Table 1 has its variant
    show = {name: v.show for name, v in params.variants.items()}
    Presentation(show, params.report)
    show["fass"] = replace(show["fass"], paper="+ L_fas")
    with pytest.raises(ValueError, match=r"variants.fass.show.paper: '\+ L_fas' is not a column"):
        Presentation(show, params.report)


def test_every_variant_has_its_own_colour() -> None:
    colours = [v.show.colour for v in load_params(REPO / "params.yaml").variants.values()]
    assert None not in colours and len(set(colours)) == len(colours)  # a figure never draws two variants alike


# ---------------------------------------------------------------------------------------------- no names in plca/


def _variant_literals(root: Path, names: set[str]) -> list[str]:
    """`file:line: 'name'` for every string constant in a .py under root (plca/methods/ aside) equal to a name."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[:2] == ("plca", "methods"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_no_variant_name_is_a_string_literal_in_plca_outside_the_methods(tmp_path: Path) -> None:
    # a variant's identity (method, options, label, tables, roles) lives in params.yaml alone
    names = set(RAW["variants"])
    assert _variant_literals(REPO / "plca", names) == []
    # the walk sees what it must: a literal in a module, in a default argument, in an f-string's constant part
    (tmp_path / "plca" / "methods").mkdir(parents=True)
    (tmp_path / "plca" / "report.py").write_text('X = 1\n\n\ndef f(v="plca"):\n    return f"{v}" + "oracle"\n')
    (tmp_path / "plca" / "methods" / "m.py").write_text('NAME = "plca"\n')  # methods name themselves
    assert _variant_literals(tmp_path / "plca", names) == ["plca/report.py:4: 'plca'", "plca/report.py:5: 'oracle'"]


def test_a_variant_on_a_network_trains_it_with_the_networks_optimiser_for_adapt_steps() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.network_of("daformer") == p.network_of("pretrain_mit") == "mit"
    assert p.network_of("dacs") is None and p.network_of("pretrain") is None
    arch, cfg = p.network_options("daformer")
    assert arch == "mit_daformer" and cfg.embed_dims == (32, 64, 160, 256) and cfg.head_channels == 64
    assert p.network_options("dacs") == ("deeplabv2", p.model)
    phase = p.phase("daformer")
    assert phase.steps == p.adapt.steps and phase.optim == p.networks["mit"].optim and phase.optim.name == "adamw"
    assert p.phase("dacs") is p.adapt  # DACS on DeepLab: the DeepLab rows' optimiser
    assert "daformer" in p.runs.trained and "pretrain_mit" not in p.runs.trained



@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["pretrain"].update(steps=-5), "params.pretrain: steps must be >= 0, got -5"),
        (lambda r: r["networks"]["mit"]["pretrain"].update(steps=-1), "params.networks.mit.pretrain: steps must be"),
        (lambda r: r["engine"].update(batch_size=0), "params.engine: batch_size must be >= 1, got 0"),
        (lambda r: r["engine"].update(grad_accum=0), "params.engine: grad_accum must be >= 1"),
        (lambda r: r["engine"].update(log_every=0), "params.engine: log_every must be >= 1"),
        (lambda r: r["engine"].update(checkpoint_every=0), "params.engine: checkpoint_every must be >= 1"),
        (lambda r: r["engine"].update(threads=-1), "params.engine: threads must be >= 0"),
        (lambda r: r["evaluate"].update(batch_size=0), "params.evaluate: batch_size must be >= 1"),
        (lambda r: r["evaluate"].update(test_time_alpha=2.0), "params.evaluate: test_time_alpha must be in [0, 1]"),
        (lambda r: r["pseudo"]["cbst_p1"].update(batch_size=0), "params.pseudo.cbst_p1: batch_size must be >= 1"),
        (lambda r: r["methods"]["plca"].update(alpha=1.5), "params.methods.plca + params.variants.fass.train.options: "
                                                           "alpha must be in [0, 1]"),
        (lambda r: r["methods"]["plca"].update(tau=0), "tau must be > 0"),
        (lambda r: r.update(seeds=[-1]), "params.seeds: expected distinct seeds >= 0, got [-1]"),
    ],
)
def test_values_out_of_range_stop_at_load_with_the_key(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    """Values that validated and then failed deep in a run (an untrained model, a ZeroDivisionError, ...)."""
    assert message in _error(edit)


def test_a_key_given_twice_in_a_params_file_is_refused(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text().replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\nseeds: [3]")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML: key 'seeds' given twice \(lines \d+ and"):
        load_params(tmp_path / "params.yaml")
