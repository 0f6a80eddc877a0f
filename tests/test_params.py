"""plca.params: cross-section rules of params.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from plca.params import load_params

REPO = Path(__file__).resolve().parents[1]


def test_test_time_alpha_follows_plca_alpha_unless_the_variant_sets_its_own(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["plca"]["alpha"] = 0.3
    raw["variants"]["source_only"]["test_time_aggregation"] = True  # a source-only model scored with Sec. 3.5
    raw["variants"]["fass"]["options"]["alpha"] = 0.2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    assert params.test_time_alpha("plca") == 0.3
    assert params.test_time_alpha("source_only") == 0.3  # not a default hidden in the code
    assert params.test_time_alpha("fass") == 0.2
    del raw["plca"]["alpha"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_params(path).test_time_alpha("source_only") == 0.5  # PLCAConfig's default, the paper's value
