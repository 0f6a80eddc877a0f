"""Report generation: results.csv, Tables 1-3 (markdown + LaTeX), figures and the reports/ index."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from plca.data.labels import CLASS_NAMES, PALETTE, PROTOCOLS
from plca.params import PublishedConfig, ReportConfig, ShowConfig, load_params
from plca.report import atomic_write, write_readme
from plca.report import figures as F
from plca.report import paper as P
from plca.report import tables as T
from plca.report.config import SPARE_COLOURS, Presentation

LABEL = "embedded toy pair (NOT GTA5/SYNTHIA)"
ABSENT = ("train", "motorcycle")  # classes the synthetic evaluation set lacks
PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
#: What the report stage passes in: every variant's `show` and the roles, from params.yaml.
SHOW = Presentation({name: v.show for name, v in PARAMS.variants.items()}, PARAMS.report)
ORDER = list(SHOW.variants)  # params order: the tables' row order
BASE = SHOW.roles.baseline


def _records() -> list[dict]:
    """Synthetic runs: every defined variant on seeds 0-2, except fass on seeds 0, 1, 5 (pairs only on 0 and 1)."""
    rng = np.random.default_rng(7)
    records = []
    for v, variant in enumerate(ORDER):
        for seed in (0, 1, 5) if variant == "fass" else (0, 1, 2):
            iou = {c: (None if c in ABSENT else float(rng.uniform(5, 95))) for c in CLASS_NAMES}
            # mIoU below 100 however many variants params defines (30 + at most 50 + 3.7 x 5 + 1)
            records.append({"variant": variant, "seed": seed,
                            "miou": 30.0 + 50.0 * v / len(ORDER) + 3.7 * seed + rng.uniform(0, 1),
                            "iou": iou, "miou16": 0.0})
    return records[::-1]  # out of order on purpose


def _frame(records: list[dict]) -> pd.DataFrame:
    return T.results_frame(records, order=ORDER)


def _miou(records, variant):
    return {r["seed"]: r["miou"] for r in records if r["variant"] == variant}


def _md_rows(text: str, first_cell: str | None = None) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip().replace("\\*", "*").replace("\\|", "|") for c in line.strip("|").split(" | ")]
            if first_cell is None or cells[0] == first_cell:
                rows.append(cells)
    return rows


def _fmt(mean: float, std: float, signed: bool = False) -> str:
    return (f"{mean:+.1f}" if signed else f"{mean:.1f}") + f" ± {std:.1f}"


# ---------------------------------------------------------------------------------------------- results.csv


def test_results_csv_columns_order_and_round_trip(tmp_path):
    records = _records()
    path = T.write_results_csv(_frame(records), tmp_path / "reports" / "results.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["variant", "seed", "miou", *CLASS_NAMES]
    keys = [(r[0], int(r[1])) for r in rows[1:]]
    expected = [(v, s) for v in ORDER for s in ((0, 1, 5) if v == "fass" else (0, 1, 2))]
    assert keys == expected  # variants in the order given (params order), seeds ascending
    # without an order, variants keep the order they first appear in (and the CSV read back keeps its own)
    unordered = T.results_frame(records)
    assert list(dict.fromkeys(unordered["variant"])) == ORDER[::-1]
    assert list(dict.fromkeys(T.read_results_csv(path)["variant"])) == ORDER
    train = rows[0].index("train")
    assert all(r[train] == "" for r in rows[1:])  # absent class -> empty cell

    back = T.read_results_csv(path)
    by_key = {(r["variant"], r["seed"]): r for r in records}
    for _, row in back.iterrows():
        rec = by_key[(row["variant"], row["seed"])]
        assert row["miou"] == pytest.approx(rec["miou"], abs=1e-9)
        assert row["road"] == pytest.approx(rec["iou"]["road"], abs=1e-9)
        assert math.isnan(row["motorcycle"])
    assert not list(path.parent.glob(".*.tmp"))


def test_record_from_evaluation_summary(tmp_path):
    from plca.evaluation.metrics import ConfusionMatrix, summarize

    gt = np.array([[0, 0, 13, 13], [0, 0, 13, 255]])
    pred = np.array([[0, 1, 13, 13], [0, 0, 0, 13]])
    matrix = ConfusionMatrix()
    matrix.update(pred, gt)
    frame = T.results_frame([T.record_from_summary("plca", 3, summarize(matrix), source_val_miou=70.0)])
    # road: tp 3, fn 1 (-> sidewalk), fp 1 (car -> road): 3/5; car: tp 2, fn 1: 2/3; sidewalk: fp only: 0
    assert frame.loc[0, "road"] == pytest.approx(60.0) and frame.loc[0, "car"] == pytest.approx(200 / 3)
    assert frame.loc[0, "miou"] == pytest.approx((60 + 200 / 3 + 0) / 3)
    assert math.isnan(frame.loc[0, "wall"]) and frame.loc[0, T.SOURCE_VAL] == 70.0
    path = T.write_results_csv(frame, tmp_path / "results.csv")  # the source-val column stays out of the CSV
    assert path.read_text().splitlines()[0] == ",".join(["variant", "seed", "miou", *CLASS_NAMES])
    with pytest.raises(T.ResultsError, match="plca seed 3: summary lacks"):
        T.record_from_summary("plca", 3, {"mIoU": {"16": 1.0}})


def test_results_reject_bad_records(tmp_path):
    good = _records()[0]
    bad_iou = {**good, "iou": {k: v for k, v in good["iou"].items() if k != "road"}}
    with pytest.raises(T.ResultsError, match="missing \\['road'\\]"):
        T.results_frame([bad_iou])
    with pytest.raises(T.ResultsError, match="appears twice"):
        T.results_frame([good, dict(good)])
    with pytest.raises(T.ResultsError, match="not a percentage"):
        T.results_frame([{**good, "miou": 0.45 * 1000}])
    with pytest.raises(T.ResultsError, match="missing key 'seed'"):
        T.results_frame([{k: v for k, v in good.items() if k != "seed"}])
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("variant,seed,mIoU\nplca,0,40\n")
    with pytest.raises(T.ResultsError, match=re.escape(str(csv_path)) + ".*header"):
        T.read_results_csv(csv_path)


# ---------------------------------------------------------------------------------------------- Table 1


def test_table1_mean_std_and_paired_gain():
    records = _records()
    md = T.table1_markdown(_frame(records), dataset_label=LABEL, show=SHOW)
    base = _miou(records, BASE)
    for variant in ("plca", "fass", "oracle"):
        ours = _miou(records, variant)
        vals = [ours[s] for s in sorted(ours)]
        diffs = [ours[s] - base[s] for s in sorted(set(ours) & set(base))]
        (row,) = _md_rows(md, SHOW.label(variant))
        assert row[2] == str(len(vals))
        assert row[3] == _fmt(statistics.mean(vals), statistics.stdev(vals))
        assert row[4] == " / ".join(f"{v:.1f}" for v in vals)
        assert row[5] == _fmt(statistics.mean(diffs), statistics.stdev(diffs), signed=True)
    assert len(set(_miou(records, "fass")) & set(base)) == 2  # fass pairs on two seeds only
    (row,) = _md_rows(md, SHOW.label(BASE))
    assert row[5] == "reference"
    assert f"ours: Δ vs {SHOW.label(BASE)}" in _md_rows(md)[0]


def test_table1_gains_follow_the_baseline_role():
    records = _records()
    show = Presentation(SHOW.variants, replace(SHOW.roles, baseline="ce_only"))
    md = T.table1_markdown(_frame(records), dataset_label=LABEL, show=show)
    base, ours = _miou(records, "ce_only"), _miou(records, "plca")
    diffs = [ours[s] - base[s] for s in sorted(ours)]
    (row,) = _md_rows(md, SHOW.label("plca"))
    assert row[5] == _fmt(statistics.mean(diffs), statistics.stdev(diffs), signed=True)
    assert _md_rows(md, SHOW.label("ce_only"))[0][5] == "reference"
    assert f"ours: Δ vs {SHOW.label('ce_only')}" in _md_rows(md)[0]


def test_rows_labels_and_tables_come_from_each_variants_show():
    records = _records()
    variants = dict(SHOW.variants)
    variants["fass"] = replace(variants["fass"], label="feature association", tables=["table2"])
    variants["minent"] = replace(variants["minent"], tables=["table1"])
    show = Presentation(variants, SHOW.roles)
    t1 = [r[0] for r in _md_rows(T.table1_markdown(_frame(records), dataset_label=LABEL, show=show))[1:]]
    t2 = [r[0] for r in _md_rows(T.table2_markdown(_frame(records), dataset_label=LABEL, show=show))
          if r[0].startswith("ours: ")]
    assert t1 == [show.label(v) for v in ORDER if show.in_table(v, "table1")]
    assert show.label("fass") not in t1 and show.label("minent") in t1  # fass is no row of Table 1 ...
    assert "ours: feature association (n=3)" in t2  # ... but of Table 2, under its new label
    in_t2 = [v for v in ORDER if show.in_table(v, "table2")]
    assert f"ours: {show.label('minent')} (n=3)" not in t2 and len(t2) == 2 * len(in_t2)  # both blocks
    # a name params do not define (a run made outside the pipeline) is shown by its name, after the others
    extra = [{**r, "variant": "mine"} for r in records if r["variant"] == "plca"]
    rows = _md_rows(T.table1_markdown(T.results_frame(records + extra, order=ORDER), dataset_label=LABEL, show=SHOW))
    assert rows[-1][0] == "mine" and rows[-1][1] == T.NA


def test_table1_scores_without_test_time_aggregation_beside_the_main_figure():
    records = _records()
    for r in records:  # only the PLCA runs were scored with aggregation, so only they have the plain figure
        if r["variant"] == "plca":
            r[T.WITHOUT_TTA] = r["miou"] + 1.5 + r["seed"]
    md = T.table1_markdown(_frame(records), dataset_label=LABEL, show=SHOW)
    title = "ours: mIoU without test-time aggregation (Δ)"
    column = _md_rows(md)[0].index(title)
    base = _miou(records, BASE)
    plain = {r["seed"]: r[T.WITHOUT_TTA] for r in records if r["variant"] == "plca"}
    vals = [plain[s] for s in sorted(plain)]
    gain = statistics.mean(plain[s] - base[s] for s in sorted(plain))
    (row,) = _md_rows(md, SHOW.label("plca"))
    assert row[column] == f"{_fmt(statistics.mean(vals), statistics.stdev(vals))} ({gain:+.1f})"
    (row,) = _md_rows(md, SHOW.label(BASE))
    assert row[column] == T.NA
    assert title not in _md_rows(T.table1_markdown(_frame(_records()), dataset_label=LABEL, show=SHOW))[0]


def test_table1_paper_columns_are_separate_and_labelled():
    md = T.table1_markdown(_frame(_records()), dataset_label=LABEL, show=SHOW)
    header = _md_rows(md)[0]
    gtav, synthia = header.index("paper GTAV→Cityscapes (19 classes)"), header.index(
        "paper SYNTHIA→Cityscapes (16 classes)"
    )
    assert all(h.startswith("paper ") for h in header if "GTA" in h or "SYNTHIA" in h)
    rows = {r[0]: r for r in _md_rows(md)[1:]}
    plca, ce_only, oracle = (rows[SHOW.label(v)] for v in ("plca", "ce_only", "oracle"))
    assert (plca[1], plca[gtav], plca[synthia]) == ("+ L_lsr = PLCA", "47.7", "46.8")  # its show.paper column
    assert (ce_only[1], ce_only[gtav], ce_only[synthia]) == ("source-only (CE)", "31.5", "35.4")
    assert (oracle[1], oracle[gtav], oracle[synthia]) == (T.NA, T.NA, T.NA)
    assert f"**{LABEL}**" in md
    assert [r[0] for r in _md_rows(md)[1:]] == [SHOW.label(v) for v in ORDER if SHOW.in_table(v, "table1")]


def test_table1_explains_the_control_row_only_when_it_is_there():
    records = _records()
    control = SHOW.roles.control
    md = T.table1_markdown(_frame(records), dataset_label=LABEL, show=SHOW)
    (row,) = _md_rows(md, SHOW.label(control))
    assert row[1] == T.NA and row[-2:] == [T.NA, T.NA]  # ours alone: no paper column, no paper figures
    assert "(ours, no paper figure): trained as PLCA with no target loss" in md and "running statistics" in md
    without = [r for r in records if r["variant"] != control]
    md = T.table1_markdown(_frame(without), dataset_label=LABEL, show=SHOW)
    assert "no target loss" not in md and "running statistics" not in md
    no_role = Presentation(SHOW.variants, replace(SHOW.roles, control=None))
    assert "running statistics" not in T.table1_markdown(_frame(records), dataset_label=LABEL, show=no_role)


def test_paper_figures_are_self_consistent():
    # the per-class rows average to the published mIoU, and Table 1 agrees with Tables 2/3; both the per-class
    # IoUs and the mIoUs are rounded to 0.1, so the recomputed mean may differ by up to 0.1
    for row in (*P.TABLE2.values(), *P.TABLE3.values()):
        assert statistics.mean(row.iou.values()) == pytest.approx(row.miou, abs=0.1)
        if row.miou13 is not None:
            ids13 = [CLASS_NAMES[i] for i in PROTOCOLS[13]]
            assert statistics.mean(row.iou[c] for c in ids13) == pytest.approx(row.miou13, abs=0.1)
    for column, row in (("+ Lovász", "Source Only"), ("+ L_lsr = PLCA", "PLCA")):
        assert P.TABLE1[P.GTAV][column] == P.TABLE2[row].miou
        assert P.TABLE1[P.SYNTHIA][column] == P.TABLE3[row].miou
    assert P.TABLE2["PLCA"].iou["traffic light"] == 36.8 and P.TABLE3["Source Only"].iou["fence"] == 0.1
    assert all(list(P.TABLE1[b]) == list(P.TABLE1_COLUMNS) for b in (P.GTAV, P.SYNTHIA))


# ---------------------------------------------------------------------------------------------- Table 2


def test_table2_per_class_protocols_and_nan():
    records = _records()
    md = T.table2_markdown(_frame(records), dataset_label=LABEL, show=SHOW)
    block19, block16 = md.split("## 16 and 13")
    header19 = _md_rows(block19)[0]
    assert header19 == ["method", *(P.CLASS_ABBREV[c] for c in CLASS_NAMES), "mIoU",
                        f"Δ vs {SHOW.label(BASE)} (paired)", T.PUBLISHED_GTA5]
    miou19 = header19.index("mIoU")
    plca = [r for r in records if r["variant"] == "plca"]
    (row,) = _md_rows(block19, "ours: PLCA (+ L_lsr) (n=3)")
    assert row[1] == f"{statistics.mean(r['iou']['road'] for r in plca):.1f}"
    assert row[header19.index("train")] == T.NA
    assert row[miou19] == f"{statistics.mean(r['miou'] for r in plca):.1f}"
    (paper_src,) = _md_rows(block19, "paper GTAV→Cityscapes: Source Only")
    assert paper_src[1:2] + paper_src[miou19:] == ["34.8", "34.3", T.NA, T.NA]  # no Δ, no `published` figure

    header16 = _md_rows(block16)[0]
    assert header16[4:7] == ["wall*", "fence*", "pole*"]
    assert header16[-4:] == ["mIoU (16)", "mIoU* (13)", T.PUBLISHED_SYNTHIA16, T.PUBLISHED_SYNTHIA13]
    (row,) = _md_rows(block16, "ours: PLCA (+ L_lsr) (n=3)")

    def proto_mean(n):
        names = [CLASS_NAMES[i] for i in PROTOCOLS[n] if CLASS_NAMES[i] not in ABSENT]
        return statistics.mean(statistics.mean(r["iou"][c] for c in names) for r in plca)

    assert row[-4:-2] == [f"{proto_mean(16):.1f}", f"{proto_mean(13):.1f}"]
    assert row[header16.index("motor")] == T.NA
    (paper_plca,) = _md_rows(block16, "paper SYNTHIA→Cityscapes: PLCA")
    assert paper_plca[-4:] == ["46.8", "54.0", T.NA, T.NA]

    # a 19-class-only run: our rows leave the 16/13 block, the paper's SYNTHIA rows stay
    md19 = T.table2_markdown(_frame(records), dataset_label=LABEL, show=SHOW, protocols=(19,))
    assert not _md_rows(md19.split("## 16 and 13")[1], "ours: PLCA (+ L_lsr) (n=3)")
    assert _md_rows(md19.split("## 16 and 13")[1], "paper SYNTHIA→Cityscapes: PLCA")


#: A hand-made presentation (params.yaml's variants change; these tests fix their own): `base` is the baseline,
#: `adv` and `ent` have published figures (`ent` a GTA5 one only), `other` none, `t1only` is no row of Table 2.
PUB_ADV = PublishedConfig(
    source="ADVENT (Vu et al., CVPR 2019) Table 1", gta5=43.8, synthia16=40.8, synthia13=47.6,
    note="best of snapshots every 2,000 iterations scored on Cityscapes val; ours: the last iterate",
)
PUB_ENT = PublishedConfig(source="Someone et al., 2020, Table 4", gta5=41.4)
HAND = Presentation(
    {
        "base": ShowConfig(label="source-only", tables=["table1", "table2"], colour="#ff7f0e"),
        "adv": ShowConfig(label="AdvEnt (multi-level)", tables=["table2"], colour="#637939", published=PUB_ADV),
        "ent": ShowConfig(label="MinEnt", tables=["table2"], colour="#17becf", published=PUB_ENT),
        "other": ShowConfig(label="PLCA", tables=["table1", "table2"], colour="#9467bd"),
        "t1only": ShowConfig(label="hidden", tables=["table1"], colour="#8c564b",
                             published=PublishedConfig(source="Nowhere 2021", gta5=50.0)),
    },
    ReportConfig(baseline="base", headline=None, qualitative=[], class_iou=[]),
)
#: mIoU per seed; `ent` ran on seed 0 only, `other` on seeds 0, 1 and 5 (pairs with the baseline on 0 and 1).
HAND_MIOU = {"base": {0: 30.0, 1: 32.0, 2: 34.0}, "adv": {0: 33.0, 1: 34.0, 2: 39.0}, "ent": {0: 31.0},
             "other": {0: 29.0, 1: 30.0, 5: 50.0}, "t1only": {0: 40.0, 1: 40.0, 2: 40.0}}


def _hand_frame() -> pd.DataFrame:
    records = [{"variant": v, "seed": seed, "miou": m, "iou": {c: (None if c in ABSENT else 50.0) for c in CLASS_NAMES}}
               for v, runs in HAND_MIOU.items() for seed, m in runs.items()]
    return T.results_frame(records, order=list(HAND.variants))


def test_presentation_published_accessor_and_checks():
    assert HAND.published("adv") is PUB_ADV and HAND.published("ent") is PUB_ENT
    assert HAND.published("base") is None and HAND.published("not_a_variant") is None
    for bad, match in ((replace(PUB_ENT, gta5=441.0), "published.gta5: 441.0 is not an mIoU"),
                       (replace(PUB_ENT, synthia13=-1), "published.synthia13"),
                       (replace(PUB_ENT, source=" "), "published.source")):
        variants = {**HAND.variants, "ent": replace(HAND.variants["ent"], published=bad)}
        with pytest.raises(ValueError, match=f"variants.ent.show.{match}"):
            Presentation(variants, HAND.roles)


def test_table2_published_columns_delta_and_sources():
    md = T.table2_markdown(_hand_frame(), dataset_label=LABEL, show=HAND)
    block19, block16 = md.split("## 16 and 13")
    header19, header16 = _md_rows(block19)[0], _md_rows(block16)[0]
    delta = "Δ vs source-only (paired)"
    assert header19[-3:] == ["mIoU", delta, "published GTA5→Cityscapes mIoU (19)"]
    assert header16[-4:] == ["mIoU (16)", "mIoU* (13)", "published SYNTHIA→Cityscapes mIoU (16)",
                             "published SYNTHIA→Cityscapes mIoU* (13)"]
    rows19 = {r[0]: r for r in _md_rows(block19)[1:]}
    rows16 = {r[0]: r for r in _md_rows(block16)[1:]}
    ours = [k for k in rows19 if k.startswith("ours: ")]
    assert ours == [k for k in rows16 if k.startswith("ours: ")]
    assert ours == ["ours: source-only (n=3)", "ours: AdvEnt (multi-level) (n=3)", "ours: MinEnt (n=1)",
                    "ours: PLCA (n=3)"]  # t1only is no row of Table 2
    # Δ: per-seed differences against the baseline's run of the same seed, mean ± std (ddof=1)
    # adv: 3, 2, 5 -> 3.33 ± 1.53; ent: 1 (one pair, no std); other: -1, -2 on the seeds both have -> -1.5 ± 0.71
    # published: the configured figures on the rows that have them, – elsewhere (the paper's rows too)
    expected = {"ours: source-only (n=3)": ("reference", T.NA, T.NA, T.NA),
                "ours: AdvEnt (multi-level) (n=3)": ("+3.3 ± 1.5", "43.8", "40.8", "47.6"),
                "ours: MinEnt (n=1)": ("+1.0 ± –", "41.4", T.NA, T.NA),
                "ours: PLCA (n=3)": ("-1.5 ± 0.7", T.NA, T.NA, T.NA)}
    for name in ours:
        d, gta5, s16, s13 = expected[name]
        assert (rows19[name][header19.index(delta)], rows19[name][-1]) == (d, gta5), name
        assert rows16[name][-2:] == [s16, s13], name
    for rows, header in ((rows19, header19), (rows16, header16)):
        assert all(len(r) == len(header) for r in rows.values())
        papers = [r for k, r in rows.items() if k.startswith("paper ")]
        assert len(papers) == 2 and all(r[-2:] == [T.NA, T.NA] for r in papers)
    assert rows19["ours: AdvEnt (multi-level) (n=3)"][header19.index("mIoU")] == "35.3"  # ours stays ours
    assert rows19["paper GTAV→Cityscapes: PLCA"][header19.index("mIoU")] == "47.7"  # the paper's rows as they were

    # each row's source and note are listed under the tables, plainly as published figures, not ours
    intro, sources = md.split("## 16 and 13")[0], md.split(T.SOURCES_TITLE)[1]
    assert "not our numbers and never come from our runs" in intro
    assert [ln for ln in sources.splitlines() if ln.startswith("- ")] == [
        "- AdvEnt (multi-level): ADVENT (Vu et al., CVPR 2019) Table 1; best of snapshots every 2,000 iterations "
        "scored on Cityscapes val; ours: the last iterate.",
        "- MinEnt: Someone et al., 2020, Table 4.",
    ]
    assert "Nowhere 2021" not in md  # a variant that is no row of Table 2 lists no source
    # the Δ column follows the baseline role
    other = Presentation(HAND.variants, replace(HAND.roles, baseline="adv"))
    md = T.table2_markdown(_hand_frame(), dataset_label=LABEL, show=other)
    (row,) = _md_rows(md.split("## 16 and 13")[0], "ours: AdvEnt (multi-level) (n=3)")
    assert "Δ vs AdvEnt (multi-level) (paired)" in _md_rows(md)[0] and row[-2] == "reference"


def test_table2_without_any_published_figure_shows_dashes_and_no_sources():
    variants = {k: replace(v, published=None) for k, v in HAND.variants.items()}
    md = T.table2_markdown(_hand_frame(), dataset_label=LABEL, show=Presentation(variants, HAND.roles))
    assert T.SOURCES_TITLE not in md
    block19, block16 = md.split("## 16 and 13")
    assert all(r[-1] == T.NA for r in _md_rows(block19)[1:])
    assert all(r[-2:] == [T.NA, T.NA] for r in _md_rows(block16)[1:])
    tex = T.table2_latex(_hand_frame(), dataset_label=LABEL, show=Presentation(variants, HAND.roles))
    assert "Sources of the published columns" not in tex


def _tex_rows(tex: str) -> list[list[list[str]]]:
    """The rows (header first) of each tabular of a LaTeX table, cells split on unescaped &."""
    blocks, current = [], None
    for line in tex.splitlines():
        if line.startswith("\\begin{tabular}"):
            current = []
        elif line == "\\end{tabular}":
            blocks.append(current)
            current = None
        elif current is not None and line.endswith("\\\\"):
            current.append([c.strip() for c in re.split(r"(?<!\\)&", line[: -2])])
    return blocks


def test_table2_latex_has_the_markdown_columns_and_sources():
    frame = _hand_frame()
    md = T.table2_markdown(frame, dataset_label=LABEL, show=HAND)
    tex = T.table2_latex(frame, dataset_label=LABEL, show=HAND)
    md_blocks = [_md_rows(block) for block in md.split("## 16 and 13")]
    tex_blocks = _tex_rows(tex)
    assert len(tex_blocks) == len(md_blocks) == 2
    for md_rows, tex_rows in zip(md_blocks, tex_blocks, strict=True):
        assert len(tex_rows) == len(md_rows)
        for md_row, tex_row in zip(md_rows, tex_rows, strict=True):
            assert tex_row == [T.latex_escape(c) for c in md_row]  # same columns, same cells, in the same order
    assert r"published GTA5$\rightarrow$Cityscapes mIoU (19)" in tex
    assert r"$\Delta$ vs source-only (paired)" in tex
    assert ("AdvEnt (multi-level): ADVENT (Vu et al., CVPR 2019) Table 1; best of snapshots every 2,000 iterations "
            "scored on Cityscapes val; ours: the last iterate.") in tex
    assert "MinEnt: Someone et al., 2020, Table 4." in tex and "never from our runs" in tex


# ---------------------------------------------------------------------------------------------- LaTeX


def test_latex_escape_and_booktabs(tmp_path):
    assert T.latex_escape("a_b & 50% #1 {x} $ ~ ^ \\") == (
        r"a\_b \& 50\% \#1 \{x\} \$ \textasciitilde{} \textasciicircum{} \textbackslash{}"
    )
    assert T.latex_escape("47.7 ± 1.2 → –") == r"47.7 $\pm$ 1.2 $\rightarrow$ --"
    label = "toy_pair 100% & more"
    results = _frame(_records())
    md1, tex1 = T.write_table1(results, tmp_path / "t1.md", tmp_path / "t1.tex", dataset_label=label, show=SHOW)
    _, tex2 = T.write_table2(results, tmp_path / "t2.md", tmp_path / "t2.tex", dataset_label=label, show=SHOW)
    assert label in md1.read_text()
    for path, ncols, table in ((tex1, 8, "table1"), (tex2, 23, "table2")):
        tex = path.read_text()
        assert r"toy\_pair 100\% \& more" in tex
        for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
            assert cmd in tex
        # every unescaped & is a column separator: the first tabular's rows (header included) all have ncols columns
        first = [ln for ln in tex.split(r"\end{tabular}")[0].splitlines() if ln.endswith(r"\\")]
        paper_rows = len(P.TABLE2) if table == "table2" else 0
        assert len(first) == 1 + sum(SHOW.in_table(v, table) for v in ORDER) + paper_rows
        assert all(len(re.split(r"(?<!\\)&", ln)) == ncols for ln in first), first[0]
        stripped = re.sub(r"\\[_%&#${}]", "", "\n".join(ln for ln in tex.splitlines() if not ln.startswith("%")))
        assert not re.search(r"[_%#]", stripped)  # every special character is escaped
        assert "–" not in tex and "±" not in tex
    assert r"+ L\_fass" in tex1.read_text() and r"$\pm$" in tex1.read_text()


# ---------------------------------------------------------------------------------------------- figures


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _count(image, rgb) -> int:
    return int((image == np.asarray(rgb, dtype=np.uint8)).all(axis=-1).sum())


def test_qualitative_grid_draws_palette_panels(tmp_path):
    h, w, rows = 24, 48, 2
    road, car, building, sky = 0, 13, 2, 10
    images = [np.full((h, w, 3), (10, 200, 10), np.uint8) for _ in range(rows)]  # a colour not in the palette
    gt = np.full((h, w), road, np.uint8)
    gt[:, w // 2 :] = car
    gt[:2] = 255
    preds = {"source-only": [np.full((h, w), building, np.int64)] * rows, "PLCA": [np.full((h, w), sky)] * rows}
    cfg = F.FigureConfig(dpi=80, panel_width=2.0)
    path = F.qualitative_grid(tmp_path / "figures" / "qual.png", images, [gt] * rows, preds, config=cfg,
                              row_names=["a", "b"])
    image = _png(path)
    assert image.shape[1] > image.shape[0] > 100 and image.shape[1] > 4 * cfg.panel_width * cfg.dpi
    # GT panels (roughly 160x80 px each, half road, half car) dominate; a legend patch is some 100 px
    panel = (cfg.panel_width * cfg.dpi) ** 2 * h / w
    for cls in (road, car):
        assert _count(image, PALETTE[cls]) > 0.5 * rows * panel / 2
    for cls in (building, sky):
        assert _count(image, PALETTE[cls]) > 0.5 * rows * panel
    assert _count(image, PALETTE[11]) == 0  # person is in no panel and so not in the legend
    assert _count(image, (10, 200, 10)) > 0.5 * rows * panel
    with pytest.raises(F.FigureError, match="'PLCA' map 1 must be integer"):
        F.qualitative_grid(tmp_path / "bad.png", images, [gt] * rows, {"PLCA": [gt, gt[:, :10]]})


def _rgb(variant: str, show: Presentation = SHOW) -> np.ndarray:
    return np.array([int(show.colour(variant)[i : i + 2], 16) for i in (1, 3, 5)])


def _near(image, rgb, tol: int = 25) -> int:
    """Pixels within tol of a colour in every channel (antialiased lines rarely hit it exactly)."""
    return int((np.abs(image.astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_training_curves_and_logs(tmp_path):
    paths = {}
    for scale, variant in enumerate(("source_only", "plca"), start=1):
        for seed in (0, 1):
            steps = np.arange(0, 50, 5)
            log = pd.DataFrame({"step": steps, "lr": 0.01 * (1 - steps / 50), "loss": scale / (1 + steps + seed)})
            if variant == "plca":
                log["fass"], log["pos_rate_f"] = 0.5 - steps / 200, 0.7
            paths[(variant, seed)] = tmp_path / f"{variant}_{seed}.csv"
            log.to_csv(paths[(variant, seed)], index=False)
    logs = F.load_training_logs(paths)
    assert list(logs.columns) == ["variant", "seed", "step", "lr", "loss", "fass", "pos_rate_f"]
    assert logs.loc[logs["variant"] == "source_only", "fass"].isna().all()
    path = F.training_curves(tmp_path / "curves.png", logs, show=SHOW, config=F.FigureConfig(dpi=60, curve_smooth=2))
    image = _png(path)
    assert image.shape[1] > image.shape[0] > 150  # 3 columns x 2 rows of subplots
    assert _near(image, _rgb("source_only")) > 50 and _near(image, _rgb("plca")) > 200  # plca has more terms
    assert _near(image, _rgb("ce_only")) == _near(image, _rgb("fass")) == 0  # not logged, not drawn
    # a variant's colour is its show.colour: recoloured, the same logs draw in the new colour
    variants = dict(SHOW.variants)
    variants["plca"] = replace(variants["plca"], colour="#00ff00")
    show = Presentation(variants, SHOW.roles)
    image = _png(F.training_curves(tmp_path / "green.png", logs, show=show, config=F.FigureConfig(dpi=60)))
    assert _near(image, _rgb("plca", show)) > 200 and _near(image, _rgb("plca")) == 0
    (tmp_path / "bad.csv").write_text("iter,loss\n0,1.0\n")
    with pytest.raises(F.FigureError, match="bad.csv: training log has no 'step'"):
        F.load_training_logs({("plca", 0): tmp_path / "bad.csv"})


def _write_log(path: Path, terms: dict[str, float], seed: int = 0) -> Path:
    steps = np.arange(0, 60, 10)
    log = pd.DataFrame({"step": steps, **{t: v / (1 + steps + seed) for t, v in terms.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    log.to_csv(path, index=False)
    return path


def test_training_curves_leave_out_variants_without_logs(tmp_path):
    """An ensemble (assembled, not trained) has no log: the curves skip it; a trained variant missing a seed's log
    still fails, naming the file."""
    from plca.report.build import ReportInputs, training_logs

    variants = ["source_only", "advent", "minent", "advent_minent"]
    terms = {"source_only": {"ce": 1.0}, "advent": {"ce": 2.0, "adv_main": 1.0, "d_main": 0.7},
             "minent": {"ce": 1.5, "entropy_t": 0.5}}
    for v, logged in terms.items():
        for seed in (0, 1):
            _write_log(tmp_path / "logs" / v / f"s{seed}.csv", logged, seed)
    variants_show = {v: ShowConfig(label=v.upper(), tables=["table2"], colour=c)
                     for v, c in zip(variants, ("#ff7f0e", "#637939", "#17becf", "#d62728"), strict=True)}
    show = Presentation(variants_show, ReportConfig(baseline="source_only", headline=None, qualitative=[],
                                                    class_iou=[]))
    inp = ReportInputs(metrics_dir=tmp_path / "metrics", logs_dir=tmp_path / "logs", eval_dir=tmp_path / "eval",
                       variants=variants, seeds=[0, 1], dataset_label=LABEL, show=show)
    logs, unlogged = training_logs(inp)
    assert unlogged == ["advent_minent"] and sorted(logs["variant"].unique()) == ["advent", "minent", "source_only"]
    image = _png(F.training_curves(tmp_path / "curves.png", logs, show=show, unlogged=unlogged,
                                   config=F.FigureConfig(dpi=60)))
    for v in ("source_only", "advent", "minent"):
        assert _near(image, _rgb(v, show)) > 50, v
    assert _near(image, _rgb("advent_minent", show)) == 0  # not drawn, not in the legend

    # a trained variant with a log for one seed but not the other fails loudly, naming what is missing
    (tmp_path / "logs" / "minent" / "s1.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"variant 'minent' missing: \[.*minent/s1\.csv'\]"):
        training_logs(inp)
    # and load_training_logs itself names a missing file's variant and seed
    with pytest.raises(FileNotFoundError, match=r"s1\.csv: training log of variant 'minent' seed 1 is missing"):
        F.load_training_logs({("minent", 1): tmp_path / "logs" / "minent" / "s1.csv"})
    with pytest.raises(F.FigureError, match="no training log of any variant"):
        training_logs(replace(inp, variants=["advent_minent"]))


def test_training_curves_many_variants_each_panel_its_loggers(tmp_path):
    """~a dozen variants logging different terms: one panel per term, drawing only the variants that log it."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#393b79",
               "#17becf", "#637939", "#843c39", "#bcbd22"]
    groups = {"ce": range(12), "lovasz": range(7), "fass": range(2, 7), "lsr_s": range(4, 7),
              "adv_main": (7, 9, 10), "d_main": (7, 9, 10), "entropy_t": (8,), "ce_aux": range(7, 11)}
    paths = {}
    for k in range(12):
        logged = {t: 1.0 + k for t, who in groups.items() if k in who}  # apart: no line hides another
        for seed in (0, 1):
            paths[(f"v{k}", seed)] = _write_log(tmp_path / f"v{k}" / f"s{seed}.csv", logged, seed)
    show = Presentation({f"v{k}": ShowConfig(label=f"variant {k}", tables=["table2"], colour=c)
                         for k, c in enumerate(palette)}, HAND.roles)
    found, unlogged = F.find_training_logs(paths)
    assert unlogged == [] and len(found) == 24
    image = _png(F.training_curves(tmp_path / "many.png", F.load_training_logs(found), show=show,
                                   config=F.FigureConfig(dpi=60)))
    assert image.shape[1] > image.shape[0]  # 8 terms: 3 columns x 3 rows
    for k in range(12):
        assert _near(image, _rgb(f"v{k}", show)) > 20, k


def test_class_iou_bars(tmp_path):
    path = F.class_iou_bars(tmp_path / "bars.png", _frame(_records()), dataset_label=LABEL,
                            variants=SHOW.roles.class_iou, show=SHOW, config=F.FigureConfig(dpi=60))
    image = _png(path)
    assert image.shape[1] > image.shape[0] > 150
    for variant in SHOW.roles.class_iou:
        assert _count(image, _rgb(variant)) > 200  # bars are solid
    assert _near(image, _rgb("sim_plca")) == 0
    with pytest.raises(F.FigureError, match="none of the variants"):
        F.class_iou_bars(tmp_path / "x.png", _frame(_records()), dataset_label=LABEL, variants=("nope",), show=SHOW)


# ---------------------------------------------------------------------------------------------- index


def test_readme_links_existing_files(tmp_path):
    (tmp_path / "figures").mkdir()
    for rel in ("table1.md", "figures/qual.png"):
        (tmp_path / rel).write_text("x")
    readme = write_readme(tmp_path / "README.md", [("table1.md", "Table 1"), ("figures/qual.png", "Fig. 3")],
                          dataset_label=LABEL, command="dvc repro", summary=T.headline(_frame(_records()), SHOW))
    text = readme.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links == ["table1.md", "figures/qual.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert LABEL in text and "`dvc repro`" in text and "paired gain" in text
    assert f"{SHOW.label(SHOW.roles.headline)}: " in text and f"vs {SHOW.label(BASE)}: " in text
    with pytest.raises(FileNotFoundError, match="table9.md"):
        write_readme(tmp_path / "README.md", [("table9.md", "nope")], dataset_label=LABEL, command="dvc repro")
    assert readme.read_text() == text  # the failed call left the old index alone


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_variant_without_a_colour_gets_a_stable_spare() -> None:
    known = {SHOW.colour(v) for v in ORDER if SHOW.variants[v].tables}
    assert known.isdisjoint(SPARE_COLOURS)  # every variant a table shows has its own colour, not a spare one
    variants = dict(SHOW.variants)
    variants["fass"] = replace(variants["fass"], colour=None)
    spare = Presentation(variants, SHOW.roles).colour("fass")
    assert spare in SPARE_COLOURS and spare != SHOW.colour("fass")
    unknown = {SHOW.colour(name) for name in ("my_method", "plca_w03", "x")}
    assert unknown <= set(SPARE_COLOURS)
    # the spare does not depend on the interpreter's string hashing, so reports rerun alike
    code = ("from plca.report.config import Presentation; "
            "print(Presentation({}, None).colour('my_method'))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == SHOW.colour("my_method")


# ---------------------------------------------------------------------------------------------- pseudo-label sets


#: Two sets on seeds 0, 1, 2: `rank` labelled by a variant HAND defines (shown by its label), precision scored on
#: seeds 0 and 1 only; `cb` labelled by the pretrained model, never scored (no target train labels).
PSEUDO_SEEDS = (0, 1, 2)
PSEUDO_RUNS = {"rank": "other", "cb": "pretrain"}
PSEUDO_ROUNDS = {"r1": ("pretrain", "cb"), "r2": ("r1", "cb"), "stage2": ("pretrain", "rank")}
PSEUDO_SUMMARIES = {
    "rank": {0: (8, 12, 0.50, 0.80), 1: (8, 12, 0.60, 0.90), 2: (9, 12, 0.55, None)},
    "cb": {0: (12, 12, None, None), 1: (12, 12, None, None), 2: (12, 12, None, None)},
}


def _pseudo_inputs(tmp_path: Path, images: dict[str, np.ndarray] | None = None):
    from plca.labelling import PseudoSetConfig
    from plca.params import RoundWiring
    from plca.report.build import ReportInputs

    pseudo_dir = tmp_path / "metrics" / "pseudo"
    policies = {"rank": ("entropy_rank", {"ratio": 0.67}), "cb": ("class_balanced", {"portion": 0.2})}
    for name, runs in PSEUDO_SUMMARIES.items():
        for seed, (labelled, total, coverage, precision) in runs.items():
            policy, options = policies[name]
            summary = {"policy": policy, "options": options, "images": total, "labelled": labelled,
                       "unlabelled": total - labelled, "coverage": coverage, "precision": precision,
                       "thresholds": [0.5] * 19}
            atomic_write(pseudo_dir / name / f"s{seed}.json", lambda f, s=summary: f.write(json.dumps(s).encode()))
    configs = {name: PseudoSetConfig(policy=p, options=o) for name, (p, o) in policies.items()}
    configs["unused"] = PseudoSetConfig(policy="entropy_rank")
    rounds = {name: RoundWiring(init=init, pseudo=ps) for name, (init, ps) in PSEUDO_ROUNDS.items()}
    return ReportInputs(metrics_dir=tmp_path / "metrics", logs_dir=tmp_path / "logs", eval_dir=tmp_path / "eval",
                        variants=["base", "other"], seeds=list(PSEUDO_SEEDS), dataset_label=LABEL, show=HAND,
                        pseudo=dict(PSEUDO_RUNS), pseudo_configs=configs, rounds=rounds, pseudo_dir=pseudo_dir,
                        target_train_image=None if images is None else images.__getitem__)


def test_pseudo_label_table_from_summaries(tmp_path):
    from plca.report import pseudo_sets as S

    inp = _pseudo_inputs(tmp_path)
    sets = S.describe_sets(inp.pseudo, inp.pseudo_configs, inp.rounds)
    assert [(s.name, s.labeller, s.rounds) for s in sets] == [("rank", "other", ("stage2",)),
                                                              ("cb", "pretrain", ("r1", "r2"))]
    md = S.pseudo_table_markdown(sets, S.load_summaries(inp.pseudo_dir, sets, inp.seeds), dataset_label=LABEL,
                                 label=HAND.label)
    rows = _md_rows(md)
    assert rows[0] == ["set", "labelled by", "policy (options)", "rounds learning from it", "n seeds",
                       "images labelled / total", "coverage (%)", "precision (%)"]
    assert [r[0] for r in rows[1:]] == ["rank", "cb"]  # runs.pseudo order
    rank, cb = rows[1], rows[2]
    assert rank[1:6] == ["PLCA", "entropy_rank (ratio=0.67)", "stage2", "3", "8.3 / 12"]
    assert rank[6] == _fmt(55.0, statistics.stdev([50.0, 60.0, 55.0]))
    assert rank[7] == _fmt(85.0, statistics.stdev([80.0, 90.0])) + " (n=2)"  # seed 2 unscored
    assert cb[1:8] == ["pretrain", "class_balanced (portion=0.2)", "r1, r2", "3", "12 / 12", T.NA, T.NA]
    assert LABEL in md and "never train" in md
    assert "agree with the target train ground truth" in md and "got a pseudo-label" in md
    for paper_word in ("GTA5→", "Kang et al."):
        assert paper_word not in md


def test_pseudo_label_report_without_sets_says_so_and_drops_a_stale_figure(tmp_path):
    from plca.report.build import pseudo_reports

    inp = replace(_pseudo_inputs(tmp_path), pseudo={}, pseudo_dir=None)
    stale = tmp_path / "reports" / "figures" / "pseudo_labels.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    entries = pseudo_reports(inp, tmp_path / "reports")
    assert [rel for rel, _ in entries] == ["pseudo_labels.md"] and not stale.exists()
    text = (tmp_path / "reports" / "pseudo_labels.md").read_text()
    assert "No pseudo-label set ran" in text and LABEL in text and "|" not in text


def test_pseudo_label_figure_one_row_per_set_few_samples_each(tmp_path):
    from plca.report.build import pseudo_reports

    h, w = 24, 48
    person, car, bus, bicycle, road = 11, 13, 15, 18, 0
    images, seed = {}, PSEUDO_SEEDS[0]
    # rank keeps 4 samples (one class each, the last in name order not drawn); cb keeps 1, half unlabelled
    for name, samples in {"rank": {"a1": person, "a2": car, "a3": bus, "a4": bicycle}, "cb": {"b1": road}}.items():
        for image, cls in samples.items():
            label = np.full((h, w), cls, np.uint8)
            if name == "cb":
                label[:, : w // 2] = 255
            folder = tmp_path / "metrics" / "pseudo" / name / f"s{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{image}.png"), label)
            images[image] = np.full((h, w, 3), (10, 200, 10), np.uint8)
    inp = _pseudo_inputs(tmp_path, images)
    entries = pseudo_reports(inp, tmp_path / "reports", samples=3)
    assert [rel for rel, _ in entries] == ["pseudo_labels.md", "figures/pseudo_labels.png"]
    figure = _png(tmp_path / "reports" / "figures" / "pseudo_labels.png")
    panel = (F.FigureConfig().panel_width * F.FigureConfig().dpi) ** 2 * h / w
    for cls in (person, car, bus):
        assert _count(figure, PALETTE[cls]) > 0.5 * panel, CLASS_NAMES[cls]
    assert _count(figure, PALETTE[bicycle]) == 0  # 4th sample of rank: not drawn, not in the legend
    assert 0.25 * panel < _count(figure, PALETTE[road]) < 0.75 * panel  # half of one panel
    assert _count(figure, (10, 200, 10)) > 0.5 * 4 * panel  # 3 + 1 target images
    assert figure.shape[1] > figure.shape[0]  # 2 rows of 6 panels

    # a pseudo-label of another size than its image is named
    cv2.imwrite(str(tmp_path / "metrics" / "pseudo" / "cb" / f"s{seed}" / "b1.png"), np.zeros((h, w // 2), np.uint8))
    with pytest.raises(F.FigureError, match="pseudo-label of b1 must be integer"):
        pseudo_reports(inp, tmp_path / "reports")


def test_pseudo_label_report_names_a_missing_summary(tmp_path):
    from plca.report.build import pseudo_reports

    inp = _pseudo_inputs(tmp_path, {})
    missing = tmp_path / "metrics" / "pseudo" / "cb" / "s1.json"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*pseudo@cb"):
        pseudo_reports(inp, tmp_path / "reports")
    assert not (tmp_path / "reports" / "pseudo_labels.md").exists()
    # a set that labelled images but kept none of their pseudo-labels is named (one that labelled none draws none)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "metrics" / "pseudo" / "rank" / "s0"))
                       + ": sample pseudo-labels"):
        pseudo_reports(replace(inp, pseudo={"rank": "other"}), tmp_path / "reports")
    # metrics of another policy than the set's config are stale
    stale = tmp_path / "metrics" / "pseudo" / "rank" / "s0.json"
    stale.write_text(json.dumps({"policy": "class_balanced", "images": 1, "labelled": 1}))
    with pytest.raises(T.ResultsError, match=re.escape(str(stale)) + ".*stale"):
        pseudo_reports(replace(inp, pseudo={"rank": "other"}), tmp_path / "reports")


def test_a_row_with_its_own_baseline_is_paired_against_it_and_says_so():
    # `mit_base` is another network's source-only row; `mit_method` pairs against it (seeds 0, 1: +5, +7)
    show = Presentation({**HAND.variants,
                         "mit_base": ShowConfig(label="MiT source-only (CE + Lovász)", short="MiT source-only",
                                                tables=["table2"], colour="#a55194"),
                         "mit_method": ShowConfig(label="DAFormer (MiT)", tables=["table2"], colour="#de9ed6",
                                                  baseline="mit_base")}, HAND.roles)
    miou = {**HAND_MIOU, "mit_base": {0: 20.0, 1: 21.0}, "mit_method": {0: 25.0, 1: 28.0, 2: 99.0}}
    records = [{"variant": v, "seed": seed, "miou": m, "iou": {c: 50.0 for c in CLASS_NAMES}}
               for v, runs in miou.items() for seed, m in runs.items()]
    results = T.results_frame(records, order=list(show.variants))
    summary = T.summarize(results, "base", show.baselines())
    assert show.baselines() == {"mit_method": "mit_base"}
    assert (summary["mit_method"].gain_vs, summary["mit_method"].gain_seeds) == ("mit_base", (0, 1))
    assert summary["mit_method"].gain_mean == 6.0 and summary["mit_method"].gain_std == pytest.approx(2 ** 0.5)
    assert summary["mit_base"].gain_vs == "base" and summary["mit_base"].gain_mean == -10.5  # vs the report's
    rows = {r[0]: r for r in _md_rows(T.table2_markdown(results, dataset_label=LABEL, show=show).split("## 16")[0])}
    delta = "Δ vs source-only (paired)"
    header = rows["method"]
    assert rows["ours: DAFormer (MiT) (n=3)"][header.index(delta)] == "+6.0 ± 1.4 (vs MiT source-only)"
    assert rows["ours: MiT source-only (CE + Lovász) (n=2)"][header.index(delta)] == "-10.5 ± 0.7"


def test_a_changed_row_names_its_change_and_shows_no_paper_or_published_figure():
    show = Presentation(HAND.variants, HAND.roles, {"adv": ("options.w_adv_main=0.002",)})
    assert show.label("adv") == "AdvEnt (multi-level) (changed: options.w_adv_main=0.002)"
    assert show.short("adv") == "AdvEnt (multi-level) (changed)" and show.published("adv") is None
    assert show.published("ent") is PUB_ENT and show.label("ent") == "MinEnt"
    changed_t1 = Presentation(HAND.variants | {"other": replace(HAND.variants["other"], paper="+ L_lsr = PLCA")},
                              HAND.roles, {"other": ("options.lsr=False",)})
    assert changed_t1.paper("other") is None
    md = T.table2_markdown(_hand_frame(), dataset_label=LABEL, show=show)
    row = next(r for r in _md_rows(md.split("## 16")[0]) if r[0].startswith("ours: AdvEnt"))
    assert row[0] == "ours: AdvEnt (multi-level) (changed: options.w_adv_main=0.002) (n=3)" and row[-1] == T.NA
    assert "AdvEnt (multi-level): ADVENT" not in md  # its published source line goes with its figures


def test_table2_notes_give_each_round_chain_its_rounds_steps_start_and_sets(tmp_path):
    from plca.report.build import ReportInputs, round_notes

    rounds = PARAMS.runs.rounds
    inp = ReportInputs(metrics_dir=tmp_path, logs_dir=tmp_path, eval_dir=tmp_path, variants=PARAMS.all_variants,
                       seeds=[0], dataset_label=LABEL, show=SHOW, rounds=rounds,
                       round_steps={r: PARAMS.steps(r) for r in rounds})
    notes = {n.split(":")[0]: n for n in round_notes(inp)}
    # one line per table row trained in rounds (the last round of each chain), none for rounds 1 and 2
    assert set(notes) == {SHOW.label(v) for v in ("intrada", "cbst", "crst", "tpld", "plca_crst")}
    steps = PARAMS.adapt.steps // 3
    assert notes[SHOW.label("cbst")] == (
        f"{SHOW.label('cbst')}: 3 rounds of {steps}, {steps}, {steps} optimiser steps ({3 * steps} in all), the first "
        "from the source-only model (pretrain), each next from the one before, learning from the pseudo-label sets "
        "cbst_p1, cbst_p2, cbst_p3 in turn (reports/pseudo_labels.md).")
    assert f"the first from {SHOW.label('plca')}," in notes[SHOW.label("plca_crst")]
    assert "tpld_p1, tpld_p2, tpld_p3 in turn" in notes[SHOW.label("tpld")]
    assert notes[SHOW.label("intrada")].startswith(
        f"{SHOW.label('intrada')}: 1 round of {PARAMS.adapt.steps // 2} optimiser steps from the source-only model")
    # a round whose steps are unknown shows "?" and no total
    inp.round_steps = {r: n for r, n in inp.round_steps.items() if r != "cbst_r2"}
    cbst = next(n for n in round_notes(inp) if n.startswith(SHOW.label("cbst") + ":"))
    assert f"of {steps}, ?, {steps} optimiser steps, the first" in cbst
    # the notes go under Table 2's intro, in markdown and LaTeX
    results = T.results_frame(_records())
    md = T.table2_markdown(results, dataset_label=LABEL, show=SHOW, notes=["rounds: a note"])
    assert "- rounds: a note" in md.split("## 19 classes")[0]
    assert "rounds: a note" in T.table2_latex(results, dataset_label=LABEL, show=SHOW, notes=["rounds: a note"])
