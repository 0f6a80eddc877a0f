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
    assert "Targets (issue 3)" in text
    assert "| predictions" in capsys.readouterr().out


def test_cli_refuses_unknown_subcommand() -> None:
    with pytest.raises(SystemExit):
        bench.main(["nonsense"])
