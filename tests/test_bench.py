"""`python -m plca.bench`: the report section it writes and one measured worker run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plca import bench


def test_replace_section_keeps_other_sections(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    report.write_text(
        "# Benchmarks\n\n## Pipeline\n\nsteps/s: 3\n\n## Association loss\n\nold table\n\n## Later\n\nx\n"
    )
    bench.replace_section(report, "## Association loss", "new table\n")
    text = report.read_text()
    assert "old table" not in text and text.count("## Association loss") == 1
    assert text.index("## Pipeline") < text.index("new table") < text.index("## Later")
    assert "steps/s: 3" in text and text.endswith("## Later\n\nx\n")
    bench.replace_section(report, "## Other", "more")
    assert report.read_text().endswith("## Other\n\nmore\n")
    assert not list(tmp_path.glob(".benchmarks.md.*"))  # no temporary file left behind


def test_replace_section_creates_the_report(tmp_path: Path) -> None:
    report = tmp_path / "reports" / "benchmarks.md"
    bench.replace_section(report, "## Association loss", "table")
    assert report.read_text() == "# Benchmarks\n\n## Association loss\n\ntable\n"


def test_inputs_are_deterministic_and_shaped() -> None:
    case = bench.AssociationCase("features", 12, 8, 5, 3, "cpu", 1, 1, "recompute")
    src, tgt, lab = bench.make_inputs(case)
    assert src.shape == tgt.shape == (1, 8, 12, 12) and lab.shape == (1, 12, 12)
    assert (src >= 0).all() and (lab == 255).any()
    assert torch.equal(bench.make_inputs(case)[0], src)
    probs = bench.make_inputs(bench.AssociationCase("predictions", 12, 5, 5, 3, "cpu", 1, 1, "dense"))[0]
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 12, 12))
    # features are drawn channels-last; --contiguous gives the same values laid out as a network's NCHW output
    assert src.is_contiguous(memory_format=torch.channels_last) and not src.is_contiguous()
    nchw = bench.make_inputs(bench.AssociationCase("features", 12, 8, 5, 3, "cpu", 1, 1, "recompute",
                                                   contiguous=True))
    assert nchw[0].is_contiguous() and nchw[1].is_contiguous()
    assert torch.equal(nchw[0], src) and torch.equal(nchw[1], tgt) and torch.equal(nchw[2], lab)


@pytest.mark.parametrize("mode", ["time", "memory"])
def test_worker_record(tmp_path: Path, mode: str) -> None:
    case = bench.AssociationCase("predictions", 10, 5, 5, 0, "cpu", 2, 1, "cached", mode)
    record = bench.run_worker(case, tmp_path)
    assert 0.0 <= record["positive_rate"] <= 1.0 and record["distinct_targets"] >= 1
    if mode == "time":
        assert len(record["seconds"]) == 2 and all(s > 0 for s in record["seconds"])
        saved = torch.load(tmp_path / "cached.pt")
        assert saved["source"].shape == (1, 5, 10, 10) and saved["loss"].ndim == 0
    else:
        assert record["peak_bytes"] >= 0 and record["memory_method"] in ("VmHWM", "ru_maxrss")


def test_association_command_writes_its_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n## Pipeline\n\nkept\n")
    bench.main(["association", "--sizes", "6", "--kinds", "predictions", "--classes", "4", "--repeats", "1",
                "--threads", "1", "--output", str(report)])
    text = report.read_text()
    assert "## Pipeline\n\nkept" in text and text.count("## Association loss") == 1
    rows = [line for line in text.splitlines() if line.startswith("| predictions")]
    assert len(rows) == 1 and "6x6 = 36" in rows[0]
    assert "Targets (issue 3)" in text and "as drawn" in text
    assert "| predictions" in capsys.readouterr().out
    bench.main(["association", "--sizes", "6", "--kinds", "features", "--feature-channels", "8", "--classes", "4",
                "--repeats", "1", "--threads", "1", "--contiguous", "--no-write"])
    out = capsys.readouterr().out
    assert "NCHW-contiguous, as a network's outputs" in out and "--contiguous" in out
    assert len([line for line in out.splitlines() if line.startswith("| features")]) == 2  # cached, recompute


def test_cli_refuses_unknown_subcommand() -> None:
    with pytest.raises(SystemExit):
        bench.main(["nonsense"])


def test_step_bench_runs_the_pipelines_step_at_tiny_shapes(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m plca.bench step` on the CPU at a tiny crop: a row per precision it can run (TF32, alone or beside
    bf16, is CUDA's), shares of the parts in [0, 100] %, its own section written beside the others."""
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Association loss\n\nkept\n")
    bench.main(["step", "--preset", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--crop", "32", "48",
                "--batch", "2", "--threads", "1", "--output", str(out)])
    text = out.read_text()
    assert "## Association loss\n\nkept" in text
    section = text[text.index("## Training step"):]
    rows = [line for line in section.splitlines() if line.startswith(("| fp32", "| bf16", "| tf32"))]
    assert [r.split("|")[1].strip() for r in rows] == ["fp32", "bf16"]
    assert "Not run: bf16+tf32 (CUDA only), tf32 (CUDA only)" in section and "32x48, 2 + 2 images" in section
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].endswith("ms") and cells[2].endswith("ms") and cells[3] == "n/a (CPU)"
        assert all(0 <= int(c.rstrip("%")) <= 100 for c in cells[4:])
    assert "| op |" not in section  # no --profile, no op table


def test_step_bench_profile_lists_the_top_ops(tmp_path: Path) -> None:
    """`--profile N`: N more steps of the first row under torch.profiler, its top ops by self time, in
    decreasing order, shares summing to at most 100 %."""
    out = tmp_path / "benchmarks.md"
    bench.main(["step", "--preset", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--crop", "32", "48",
                "--batch", "2", "--threads", "1", "--precisions", "fp32", "--profile", "2", "--output", str(out)])
    section = out.read_text()
    assert "torch.profiler, 2 more steps of fp32" in section
    table = section[section.index("| op |"):].splitlines()[2:]
    assert len(table) == 12  # a step has more than 12 distinct ops: the table is cut at --profile's top 12
    names = [row.split("|")[1].strip().strip("`") for row in table]
    shares = [float(row.split("|")[3].strip().rstrip("%")) for row in table]
    assert "aten::convolution_backward" in names and shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
    with pytest.raises(SystemExit, match="--profile >= 0"):
        bench.main(["step", "--device", "cpu", "--profile", "-1", "--no-write"])


def test_step_bench_measures_each_association_kernel_asked_for(tmp_path: Path) -> None:
    """`--impls`: a row per kernel and precision, labelled with both; the kernels named in the section."""
    out = tmp_path / "benchmarks.md"
    bench.main(["step", "--preset", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--crop", "32", "48",
                "--batch", "2", "--threads", "1", "--precisions", "fp32", "--impls", "blocked", "dense",
                "--output", str(out)])
    section = out.read_text()
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| fp32")]
    assert rows == ["fp32, blocked", "fp32, dense"]
    assert "Association kernels (PLCA's `impl`): blocked, dense" in section


def test_step_bench_batch_feeds_every_term_of_plca() -> None:
    """The synthetic batch has the shapes of the preset and labels with unlabelled cells, and the PLCA method
    (which the bench times through the engine) computes every one of its terms on it."""
    from plca.bench_step import PRESETS, synthetic_batch
    from plca.methods import build_method
    from plca.models.deeplabv2 import DeepLabV2Config, build_model

    preset = PRESETS["toy"]
    batch = synthetic_batch(preset, 19, torch.device("cpu"), 0)
    assert batch["source_image"].shape == (4, 3, 64, 128) and batch["source_label"].shape == (4, 64, 128)
    assert (batch["source_label"] == 255).any() and (batch["source_label"] < 19).any()
    model = build_model(DeepLabV2Config(num_classes=19, **preset.model))
    terms = build_method("plca", model, {}).training_step(batch).terms
    assert {"ce", "lovasz", "fass", "cass", "lsr_s", "lsr_t"} <= set(terms)


def test_step_bench_refuses_cuda_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["step", "--device", "cuda", "--no-write"])
