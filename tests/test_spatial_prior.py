"""CBST-SP's spatial prior (CBST, Zou et al. ECCV 2018, Eq. 8): counting the source classes at each location,
smoothing and normalising them (plca.pseudo), applying the prior to the class probabilities (not renormalised, as
the released code), a pseudo-label set chosen from the product, and the errors of a wrong prior or set."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_labelling import RAW, FakeReader, Stub

from plca.config import ConfigError
from plca.labelling import (
    LABELS_DIR,
    PseudoSetConfig,
    SpatialPriorConfig,
    make_pseudo_set,
    read_spatial_prior,
    write_spatial_prior,
)
from plca.params import load_params
from plca.pseudo import apply_spatial_prior, location_class_counts, spatial_prior

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


def test_counts_are_per_class_and_location_and_skip_ignored_pixels() -> None:
    labels = torch.tensor([[[0, 1], [255, 1]],
                           [[1, 1], [0, 2]]])
    counts = location_class_counts(labels, 3)
    assert counts.dtype == torch.int64 and counts.shape == (3, 2, 2)
    assert counts[0].tolist() == [[1, 0], [1, 0]]
    assert counts[1].tolist() == [[1, 2], [0, 1]]
    assert counts[2].tolist() == [[0, 0], [0, 1]] and int(counts.sum()) == 7  # 8 pixels, one ignored
    with pytest.raises(ValueError, match=r"label values \[3\] outside \[0, 3\)"):
        location_class_counts(torch.tensor([[[3, 0]]]), 3)
    with pytest.raises(ValueError, match="integer labels"):
        location_class_counts(torch.zeros(2, 2), 3)


def test_without_smoothing_the_prior_is_each_locations_class_frequency() -> None:
    counts = torch.tensor([[[3.0, 0.0, 0.0]],
                           [[1.0, 2.0, 0.0]]], dtype=F64)  # C = 2, one row of 3 locations, the last never labelled
    q = spatial_prior(counts, sigma=0.0)
    assert q.dtype == F64
    torch.testing.assert_close(q[:, 0, 0], torch.tensor([0.75, 0.25], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(q[:, 0, 1], torch.tensor([0.0, 1.0], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(q[:, 0, 2], torch.tensor([0.5, 0.5], dtype=F64), rtol=0, atol=0)  # uniform


def _reference_smooth(row: np.ndarray, sigma: float) -> np.ndarray:
    """A literal 1-D Gaussian smoothing with the border value repeated, window +-ceil(3 sigma)."""
    r = math.ceil(3 * sigma)
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    w /= w.sum()
    return np.array([sum(w[k + r] * row[min(max(i + k, 0), len(row) - 1)] for k in range(-r, r + 1))
                     for i in range(len(row))])


def test_smoothing_is_a_border_repeating_gaussian_before_the_normalisation() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5, (3, 1, 9), generator=gen).to(F64)  # one row: the vertical pass changes nothing
    sigma = 0.8  # window +-3 pixels
    q = spatial_prior(counts, sigma=sigma)
    smooth = np.stack([_reference_smooth(counts[c, 0].numpy(), sigma) for c in range(3)])
    np.testing.assert_allclose(q[:, 0].numpy(), smooth / smooth.sum(0), rtol=1e-12)
    torch.testing.assert_close(q.sum(0), torch.ones(1, 9, dtype=F64))
    # a field the same everywhere stays so, and the two passes are one 2-D Gaussian: a transposed field gives the
    # transposed prior
    flat = torch.tensor([2.0, 6.0], dtype=F64)[:, None, None].expand(2, 5, 7)
    torch.testing.assert_close(spatial_prior(flat, sigma=1.5), torch.tensor([0.25, 0.75], dtype=F64)[:, None, None]
                               .expand(2, 5, 7))
    field = torch.rand(2, 6, 8, generator=gen, dtype=F64)
    torch.testing.assert_close(spatial_prior(field.transpose(1, 2), sigma=1.2),
                               spatial_prior(field, sigma=1.2).transpose(1, 2))
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        spatial_prior(counts, sigma=-1.0)
    with pytest.raises(ValueError, match="float counts"):
        spatial_prior(counts.long(), sigma=1.0)


def test_the_prior_multiplies_the_probabilities_at_their_size_without_renormalising() -> None:
    probs = torch.tensor([0.6, 0.4], dtype=F64)[None, :, None, None].expand(1, 2, 2, 4).clone()
    prior = torch.tensor([[[0.2, 1.0]], [[0.8, 0.0]]], dtype=torch.float32)  # [C = 2, 1, 2]: left, right
    out = apply_spatial_prior(probs, prior)
    assert out.dtype == F64 and out.shape == probs.shape
    # bilinear from 2 to 4 columns (align_corners False): weights 1, 3/4 + 1/4, 1/4 + 3/4, 1 of left and right
    q0 = torch.tensor([0.2, 0.4, 0.8, 1.0], dtype=F64)
    torch.testing.assert_close(out[0, 0], 0.6 * q0.expand(2, 4), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[0, 1], 0.4 * (1 - q0).expand(2, 4), rtol=1e-6, atol=1e-7)
    assert float(out[0, :, 0, 0].sum()) == pytest.approx(0.12 + 0.32)  # not 1: the product is not renormalised
    with pytest.raises(ValueError, match=r"the prior must be \[C = 2, h, w\]"):
        apply_spatial_prior(probs, torch.ones(3, 2, 4))


# The stub model's images (test_labelling): every pixel of (200, 0, 0) predicts class 0 with p = (0.9992, 4e-4,
# 4e-4). The prior makes class 0 impossible on the left half and the only class on the right half.
H, W = 4, 6


def _half_prior() -> torch.Tensor:
    prior = torch.zeros(3, H, W)
    prior[1, :, : W // 2] = 1.0
    prior[0, :, W // 2:] = 1.0
    return prior


def test_a_set_with_the_prior_labels_from_the_product(tmp_path: Path) -> None:
    reader = FakeReader([(200, 0, 0), (200, 0, 0)])
    options = {"portion": 1.0, "ds_rate": 1}  # every predicted pixel kept: the labels are the product's argmax
    plain = make_pseudo_set(Stub(), reader, RAW, PseudoSetConfig(policy="class_balanced", options=options),
                            tmp_path / "plain", torch.device("cpu"), progress=False)
    with_prior = make_pseudo_set(Stub(), reader, RAW,
                                 PseudoSetConfig(policy="class_balanced", options=options, spatial_prior=True),
                                 tmp_path / "sp", torch.device("cpu"), progress=False, prior=_half_prior())
    assert "spatial_prior" not in plain and with_prior["spatial_prior"] is True
    p = torch.softmax(torch.tensor([200 * 10 / 255, 0.0, 0.0], dtype=torch.float32), 0)
    # thresholds of the product: class 0 from the right half (p0 x 1), class 1 from the left (p1 x 1), class 2
    # never the argmax (1.0); without the prior class 0 holds every pixel
    assert with_prior["thresholds"] == pytest.approx([float(p[0]), float(p[1]), 1.0], rel=1e-6)
    assert plain["thresholds"] == pytest.approx([float(p[0]), 1.0, 1.0], rel=1e-6)
    for name in reader.names:
        label = cv2.imread(str(tmp_path / "sp" / LABELS_DIR / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert (label[:, : W // 2] == 1).all() and (label[:, W // 2:] == 0).all()
        assert (cv2.imread(str(tmp_path / "plain" / LABELS_DIR / f"{name}.png"), cv2.IMREAD_UNCHANGED) == 0).all()


def test_a_set_with_the_prior_needs_a_policy_that_takes_one_and_the_prior(tmp_path: Path) -> None:
    reader = FakeReader([(200, 0, 0)])
    with pytest.raises(ValueError, match="policy 'entropy_rank' takes no spatial prior"):
        make_pseudo_set(Stub(), reader, RAW, PseudoSetConfig(policy="entropy_rank", spatial_prior=True),
                        tmp_path / "a", torch.device("cpu"), progress=False, prior=_half_prior())
    with pytest.raises(ValueError, match="spatial_prior is set, but no spatial prior was given"):
        make_pseudo_set(Stub(), reader, RAW, PseudoSetConfig(policy="class_balanced", spatial_prior=True),
                        tmp_path / "b", torch.device("cpu"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_params_refuse_a_prior_on_a_policy_that_takes_none(tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pseudo"]["intrada_rank"]["spatial_prior"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params.pseudo.intrada_rank.spatial_prior: policy 'entropy_rank' takes "
                                          r"no spatial prior; those that do: \['class_balanced'"):
        load_params(tmp_path / "params.yaml")
    raw["pseudo"]["intrada_rank"]["spatial_prior"] = False
    raw["spatial_prior"]["window"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"spatial_prior.*window must be a share of the width in \[0, 1\)"):
        load_params(tmp_path / "params.yaml")


def test_a_written_prior_reads_back_and_a_wrong_file_is_named(tmp_path: Path) -> None:
    prior = _half_prior()
    write_spatial_prior(prior.double(), tmp_path / "spatial.npy")
    back = read_spatial_prior(tmp_path / "spatial.npy", 3)
    assert back.dtype == torch.float32 and torch.equal(back, prior)
    with pytest.raises(ValueError, match=r"spatial.npy: a spatial prior is \[C = 19, h, w\], got \[3, 4, 6\]"):
        read_spatial_prior(tmp_path / "spatial.npy", 19)
    np.save(tmp_path / "negative.npy", -np.ones((3, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"negative.npy: a spatial prior holds finite values >= 0"):
        read_spatial_prior(tmp_path / "negative.npy", 3)
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(ValueError, match=r"text.npy: not a spatial prior"):
        read_spatial_prior(tmp_path / "text.npy", 3)
    with pytest.raises(FileNotFoundError, match=r"missing.npy: no spatial prior; the spatial_prior stage writes it"):
        read_spatial_prior(tmp_path / "missing.npy", 3)


def test_the_config_gives_sigma_as_a_sixth_of_the_window() -> None:
    cfg = SpatialPriorConfig(size=(2048, 1024), window=70 / 2048)
    assert cfg.sigma == pytest.approx(70 / 6)
    with pytest.raises(ValueError, match=r"size must be \(w, h\) >= 1"):
        SpatialPriorConfig(size=(0, 4))
    with pytest.raises(ValueError, match=r"window must be a share of the width in \[0, 1\)"):
        SpatialPriorConfig(window=-0.1)
