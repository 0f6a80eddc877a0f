"""Report generation: results.csv, Tables 1-3 (markdown + LaTeX), figures and the reports/ index."""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from plca.data.labels import CLASS_NAMES, PALETTE, PROTOCOLS
from plca.report import atomic_write, write_readme
from plca.report import figures as F
from plca.report import paper as P
from plca.report import tables as T

LABEL = "embedded toy pair (NOT GTA5/SYNTHIA)"
ABSENT = ("train", "motorcycle")  # classes the synthetic evaluation set lacks


def _records() -> list[dict]:
    """Synthetic runs: every variant on seeds 0-2, except fass on seeds 0, 1, 5 (pairs only on 0 and 1)."""
    rng = np.random.default_rng(7)
    records = []
    for v, variant in enumerate(T.VARIANTS):
        for seed in (0, 1, 5) if variant == "fass" else (0, 1, 2):
            iou = {c: (None if c in ABSENT else float(rng.uniform(5, 95))) for c in CLASS_NAMES}
            records.append({"variant": variant, "seed": seed, "miou": 30.0 + 2 * v + 3.7 * seed + rng.uniform(0, 1),
                            "iou": iou, "miou16": 0.0})
    return records[::-1]  # out of order on purpose


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
    path = T.write_results_csv(records, tmp_path / "reports" / "results.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["variant", "seed", "miou", *CLASS_NAMES]
    keys = [(r[0], int(r[1])) for r in rows[1:]]
    expected = [(v, s) for v in T.VARIANTS for s in ((0, 1, 5) if v == "fass" else (0, 1, 2))]
    assert keys == expected
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
    md = T.table1_markdown(T.results_frame(records), dataset_label=LABEL)
    base = _miou(records, "source_only")
    for variant in ("plca", "fass", "oracle"):
        ours = _miou(records, variant)
        vals = [ours[s] for s in sorted(ours)]
        diffs = [ours[s] - base[s] for s in sorted(set(ours) & set(base))]
        (row,) = _md_rows(md, T.VARIANT_LABELS[variant])
        assert row[2] == str(len(vals))
        assert row[3] == _fmt(statistics.mean(vals), statistics.stdev(vals))
        assert row[4] == " / ".join(f"{v:.1f}" for v in vals)
        assert row[5] == _fmt(statistics.mean(diffs), statistics.stdev(diffs), signed=True)
    assert len(set(_miou(records, "fass")) & set(base)) == 2  # fass pairs on two seeds only
    (row,) = _md_rows(md, T.VARIANT_LABELS["source_only"])
    assert row[5] == "reference"


def test_table1_scores_without_test_time_aggregation_beside_the_main_figure():
    records = _records()
    for r in records:  # only the PLCA runs were scored with aggregation, so only they have the plain figure
        if r["variant"] == "plca":
            r[T.WITHOUT_TTA] = r["miou"] + 1.5 + r["seed"]
    md = T.table1_markdown(T.results_frame(records), dataset_label=LABEL)
    title = "ours: mIoU without test-time aggregation (Δ)"
    column = _md_rows(md)[0].index(title)
    base = _miou(records, "source_only")
    plain = {r["seed"]: r[T.WITHOUT_TTA] for r in records if r["variant"] == "plca"}
    vals = [plain[s] for s in sorted(plain)]
    gain = statistics.mean(plain[s] - base[s] for s in sorted(plain))
    (row,) = _md_rows(md, T.VARIANT_LABELS["plca"])
    assert row[column] == f"{_fmt(statistics.mean(vals), statistics.stdev(vals))} ({gain:+.1f})"
    (row,) = _md_rows(md, T.VARIANT_LABELS["source_only"])
    assert row[column] == T.NA
    assert title not in _md_rows(T.table1_markdown(T.results_frame(_records()), dataset_label=LABEL))[0]


def test_table1_paper_columns_are_separate_and_labelled():
    md = T.table1_markdown(T.results_frame(_records()), dataset_label=LABEL)
    header = _md_rows(md)[0]
    gtav, synthia = header.index("paper GTAV→Cityscapes (19 classes)"), header.index(
        "paper SYNTHIA→Cityscapes (16 classes)"
    )
    assert all(h.startswith("paper ") for h in header if "GTA" in h or "SYNTHIA" in h)
    rows = {r[0]: r for r in _md_rows(md)[1:]}
    assert (rows[T.VARIANT_LABELS["plca"]][gtav], rows[T.VARIANT_LABELS["plca"]][synthia]) == ("47.7", "46.8")
    assert (rows[T.VARIANT_LABELS["ce_only"]][gtav], rows[T.VARIANT_LABELS["ce_only"]][synthia]) == ("31.5", "35.4")
    assert (rows[T.VARIANT_LABELS["oracle"]][gtav], rows[T.VARIANT_LABELS["oracle"]][synthia]) == (T.NA, T.NA)
    assert f"**{LABEL}**" in md
    assert [r[0] for r in _md_rows(md)[1:]] == [T.VARIANT_LABELS[v] for v in T.VARIANTS]


def test_table1_explains_the_control_row_only_when_it_is_there():
    records = _records()
    md = T.table1_markdown(T.results_frame(records), dataset_label=LABEL)
    (row,) = _md_rows(md, T.VARIANT_LABELS[T.CONTROL])
    assert row[1] == T.NA and row[-2:] == [T.NA, T.NA]  # ours alone: no paper column, no paper figures
    assert "(ours, no paper figure): trained as PLCA with no target loss" in md and "running statistics" in md
    without = [r for r in records if r["variant"] != T.CONTROL]
    md = T.table1_markdown(T.results_frame(without), dataset_label=LABEL)
    assert "no target loss" not in md and "running statistics" not in md


def test_paper_figures_are_self_consistent():
    # the per-class rows average to the published mIoU, and Table 1 agrees with Tables 2/3; both the per-class
    # IoUs and the mIoUs are rounded to 0.1, so the recomputed mean may differ by up to 0.1
    for row in (*P.TABLE2.values(), *P.TABLE3.values()):
        assert statistics.mean(row.iou.values()) == pytest.approx(row.miou, abs=0.1)
        if row.miou13 is not None:
            ids13 = [CLASS_NAMES[i] for i in PROTOCOLS[13]]
            assert statistics.mean(row.iou[c] for c in ids13) == pytest.approx(row.miou13, abs=0.1)
    for key in ("source_only", "plca"):
        assert P.TABLE1[P.GTAV][key] == P.TABLE2[key].miou
        assert P.TABLE1[P.SYNTHIA][key] == P.TABLE3[key].miou
    assert P.TABLE2["plca"].iou["traffic light"] == 36.8 and P.TABLE3["source_only"].iou["fence"] == 0.1


# ---------------------------------------------------------------------------------------------- Table 2


def test_table2_per_class_protocols_and_nan():
    records = _records()
    md = T.table2_markdown(T.results_frame(records), dataset_label=LABEL)
    block19, block16 = md.split("## 16 and 13")
    header19 = _md_rows(block19)[0]
    assert header19 == ["method", *(P.CLASS_ABBREV[c] for c in CLASS_NAMES), "mIoU"]
    plca = [r for r in records if r["variant"] == "plca"]
    (row,) = _md_rows(block19, "ours: PLCA (+ L_lsr) (n=3)")
    assert row[1] == f"{statistics.mean(r['iou']['road'] for r in plca):.1f}"
    assert row[header19.index("train")] == T.NA
    assert row[-1] == f"{statistics.mean(r['miou'] for r in plca):.1f}"
    (paper_src,) = _md_rows(block19, "paper GTAV→Cityscapes: Source Only")
    assert (paper_src[1], paper_src[-1]) == ("34.8", "34.3")

    header16 = _md_rows(block16)[0]
    assert header16[4:7] == ["wall*", "fence*", "pole*"] and header16[-2:] == ["mIoU (16)", "mIoU* (13)"]
    (row,) = _md_rows(block16, "ours: PLCA (+ L_lsr) (n=3)")

    def proto_mean(n):
        names = [CLASS_NAMES[i] for i in PROTOCOLS[n] if CLASS_NAMES[i] not in ABSENT]
        return statistics.mean(statistics.mean(r["iou"][c] for c in names) for r in plca)

    assert row[-2:] == [f"{proto_mean(16):.1f}", f"{proto_mean(13):.1f}"]
    assert row[header16.index("motor")] == T.NA
    (paper_plca,) = _md_rows(block16, "paper SYNTHIA→Cityscapes: PLCA")
    assert paper_plca[-2:] == ["46.8", "54.0"]

    # a 19-class-only run: our rows leave the 16/13 block, the paper's SYNTHIA rows stay
    md19 = T.table2_markdown(T.results_frame(records), dataset_label=LABEL, protocols=(19,))
    assert not _md_rows(md19.split("## 16 and 13")[1], "ours: PLCA (+ L_lsr) (n=3)")
    assert _md_rows(md19.split("## 16 and 13")[1], "paper SYNTHIA→Cityscapes: PLCA")


# ---------------------------------------------------------------------------------------------- LaTeX


def test_latex_escape_and_booktabs(tmp_path):
    assert T.latex_escape("a_b & 50% #1 {x} $ ~ ^ \\") == (
        r"a\_b \& 50\% \#1 \{x\} \$ \textasciitilde{} \textasciicircum{} \textbackslash{}"
    )
    assert T.latex_escape("47.7 ± 1.2 → –") == r"47.7 $\pm$ 1.2 $\rightarrow$ --"
    label = "toy_pair 100% & more"
    results = T.results_frame(_records())
    md1, tex1 = T.write_table1(results, tmp_path / "t1.md", tmp_path / "t1.tex", dataset_label=label)
    _, tex2 = T.write_table2(results, tmp_path / "t2.md", tmp_path / "t2.tex", dataset_label=label)
    assert label in md1.read_text()
    for path, ncols in ((tex1, 8), (tex2, 21)):
        tex = path.read_text()
        assert r"toy\_pair 100\% \& more" in tex
        for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
            assert cmd in tex
        body = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
        # every unescaped & is a column separator: first table's rows all have ncols columns
        first = body[: len(T.VARIANTS) + 1]
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


def _rgb(variant: str) -> np.ndarray:
    return np.array([int(F.variant_color(variant)[i : i + 2], 16) for i in (1, 3, 5)])


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
    path = F.training_curves(tmp_path / "curves.png", logs, config=F.FigureConfig(dpi=60, curve_smooth=2))
    image = _png(path)
    assert image.shape[1] > image.shape[0] > 150  # 3 columns x 2 rows of subplots
    assert _near(image, _rgb("source_only")) > 50 and _near(image, _rgb("plca")) > 200  # plca has more terms
    assert _near(image, _rgb("ce_only")) == _near(image, _rgb("fass")) == 0  # not logged, not drawn
    (tmp_path / "bad.csv").write_text("iter,loss\n0,1.0\n")
    with pytest.raises(F.FigureError, match="bad.csv: training log has no 'step'"):
        F.load_training_logs({("plca", 0): tmp_path / "bad.csv"})


def test_class_iou_bars(tmp_path):
    path = F.class_iou_bars(tmp_path / "bars.png", T.results_frame(_records()), dataset_label=LABEL,
                            config=F.FigureConfig(dpi=60))
    image = _png(path)
    assert image.shape[1] > image.shape[0] > 150
    for variant in ("source_only", "plca", "oracle"):
        assert _count(image, _rgb(variant)) > 200  # bars are solid
    assert _near(image, _rgb("sim_plca")) == 0
    with pytest.raises(F.FigureError, match="none of the variants"):
        F.class_iou_bars(tmp_path / "x.png", T.results_frame(_records()), dataset_label=LABEL, variants=("nope",))


# ---------------------------------------------------------------------------------------------- index


def test_readme_links_existing_files(tmp_path):
    (tmp_path / "figures").mkdir()
    for rel in ("table1.md", "figures/qual.png"):
        (tmp_path / rel).write_text("x")
    readme = write_readme(tmp_path / "README.md", [("table1.md", "Table 1"), ("figures/qual.png", "Fig. 3")],
                          dataset_label=LABEL, command="dvc repro", summary=T.headline(T.results_frame(_records())))
    text = readme.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links == ["table1.md", "figures/qual.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert LABEL in text and "`dvc repro`" in text and "paired gain" in text
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


def test_every_known_variant_has_its_own_colour_and_unknown_ones_get_a_spare() -> None:
    known = {v: F.variant_color(v) for v in T.VARIANTS}
    assert len(set(known.values())) == len(T.VARIANTS)  # a figure never draws two known variants alike
    assert set(known.values()).isdisjoint(F._SPARE)  # every known variant has a fixed colour, not a spare one
    unknown = {F.variant_color(name) for name in ("my_method", "plca_w03", "x")}
    assert unknown and not unknown & set(known.values())
    # an unknown variant's colour does not depend on the interpreter's string hashing, so reports rerun alike
    code = "from plca.report.figures import variant_color; print(variant_color('my_method'))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == F.variant_color("my_method")
