"""Near-organ uncertainty metrics: the mm band, AUROC/ECE inside it, flagged errors, Spearman, CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.evaluation import auroc, evaluate, near_band, organ_uncertainty, parse_label_specs, spearman


def _brute_distance(union: np.ndarray, spacing_zyx) -> np.ndarray:
    """Physical distance from every voxel to the nearest voxel of ``union``, by trying them all."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in union.shape], indexing="ij"), -1).reshape(-1, 3)
    pts = np.argwhere(union)
    sp = np.asarray(spacing_zyx, float)
    d = np.sqrt(((((grid[:, None, :] - pts[None, :, :]) * sp) ** 2).sum(-1)))
    return d.min(axis=1).reshape(union.shape)


def _auroc_pairs(scores, labels) -> float:
    s = np.asarray(scores, float).ravel()
    y = np.asarray(labels, bool).ravel()
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


# -- the band --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_near_band_matches_brute_force_on_anisotropic_grid(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (7, 13, 11), (2.5, 0.7, 1.1)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    pred[2:4, 3:6, 4:7] = True
    gt[rng.random(shape) < 0.01] = True  # scattered true voxels, so the union's box is irregular
    dist = _brute_distance(pred | gt, spacing)
    for band in (0.0, 1.3, 3.05, 7.7, 40.0):  # none exactly on a voxel distance; 40 mm covers the volume
        got = near_band(pred, gt, spacing, band)
        want = dist <= band
        assert got.dtype == bool and got.shape == shape
        assert np.array_equal(got, want), f"band {band} mm: {int((got != want).sum())} voxels differ"


def test_near_band_uses_millimetres_per_axis():
    pred = np.zeros((9, 9, 9), bool)
    pred[4, 4, 4] = True
    band = near_band(pred, np.zeros_like(pred), (2.5, 0.8, 0.8), 2.0)
    # along z one slice is 2.5 mm: out; in-plane two voxels are 1.6 mm: in, three are 2.4 mm: out
    assert not band[3, 4, 4] and not band[5, 4, 4]
    assert band[4, 4, 6] and band[4, 2, 4] and not band[4, 4, 7] and not band[4, 1, 4]
    assert band[4, 5, 5] and not band[4, 6, 6]  # diagonals: 1.13 mm in, 2.26 mm out
    # in-plane disc 0.64·(i² + j²) <= 4, i.e. i² + j² <= 6.25: (0,0), 4 × (1,0), 4 × (1,1), 4 × (2,0), 8 × (2,1)
    assert band.sum() == 1 + 4 + 4 + 4 + 8


def test_near_band_empty_masks_and_bad_input():
    assert not near_band(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool), (1, 1, 1), 10).any()
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 5\)"):
        near_band(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 5), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        near_band(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1, 1))


# -- AUROC and flagged errors ----------------------------------------------------------------------


def _ring_case():
    """A cube organ whose prediction misses its in-plane rim; uncertainty 1 exactly on the missed rim."""
    shape, spacing = (14, 30, 30), (2.0, 1.0, 1.0)
    gt = np.zeros(shape, bool)
    gt[5:9, 10:20, 10:20] = True
    pred = np.zeros(shape, bool)
    pred[5:9, 11:19, 11:19] = True
    band_mm = 4.0
    dist = _brute_distance(gt, spacing)
    rng = np.random.default_rng(7)
    score = np.where(gt & ~pred, 1.0, 0.0)
    near = dist <= band_mm
    score[near & ~(gt & ~pred)] = rng.random(int((near & ~(gt & ~pred)).sum())) * 0.5  # quiet near the organ
    far = dist > band_mm + 1.0
    score[far] = rng.random(int(far.sum())) * 2.0  # noisy background, half of it above the rim's 1.0
    return pred, gt, score, spacing, band_mm, near


def test_auroc_near_is_perfect_on_the_error_ring_while_background_noise_lowers_the_whole_volume():
    pred, gt, score, spacing, band_mm, near = _ring_case()
    r = organ_uncertainty(pred, gt, score, spacing_zyx=spacing, band_mm=band_mm, flag_threshold=0.9)
    errors = pred != gt
    assert r["auroc_near"] == 1.0
    assert r["auroc"] == pytest.approx(_auroc_pairs(score, errors), abs=1e-12)
    assert r["auroc"] < 0.9
    assert r["near_voxels"] == int(near.sum()) and r["error_voxels_near"] == int(errors.sum())
    assert r["false_negative_voxels"] == int((gt & ~pred).sum()) == 4 * (100 - 64)
    assert r["fn_flagged"] == 1.0 and r["fp_flagged"] is None  # no false positives
    assert r["ece"] is None and r["ece_near"] is None  # no probability map
    assert r["mean_score_near"] == pytest.approx(float(score[near].mean()))
    assert r["mean_score_in_prediction"] == pytest.approx(float(score[pred].mean()))


def test_flagged_fractions_on_a_constructed_case():
    shape = (6, 12, 12)
    gt = np.zeros(shape, bool)
    gt[2:4, 3:8, 3:8] = True
    pred = gt.copy()
    missed = [(2, 3, c) for c in range(3, 8)] + [(3, 3, c) for c in range(3, 8)]  # 10 false negatives
    added = [(2, 9, c) for c in range(3, 9)]  # 6 false positives
    for v in missed:
        pred[v] = False
    for v in added:
        pred[v] = True
    score = np.full(shape, 0.1, np.float32)
    for v in missed[:4]:
        score[v] = 0.8
    for v in missed[4:]:
        score[v] = 0.2
    for v in added[:3]:
        score[v] = 0.6
    kw = dict(spacing_zyx=(3.0, 1.0, 1.0), band_mm=3.0)
    r = organ_uncertainty(pred, gt, score, flag_threshold=0.5, **kw)
    assert r["false_negative_voxels"] == 10 and r["false_positive_voxels"] == 6
    assert r["fn_flagged"] == pytest.approx(0.4) and r["fp_flagged"] == pytest.approx(0.5)
    assert organ_uncertainty(pred, gt, score, flag_threshold=0.8, **kw)["fn_flagged"] == pytest.approx(0.4)  # >=
    r = organ_uncertainty(pred, gt, score, flag_threshold=0.81, **kw)
    assert r["fn_flagged"] == 0.0 and r["fp_flagged"] == 0.0
    assert organ_uncertainty(pred, gt, score, **kw)["fn_flagged"] is None  # no threshold
    assert organ_uncertainty(gt, gt, score, flag_threshold=0.5, **kw)["fn_flagged"] is None  # no misses
    n_pred = int(pred.sum())
    assert r["mean_score_in_prediction"] == pytest.approx((3 * 0.6 + (n_pred - 3) * 0.1) / n_pred, rel=1e-6)
    assert organ_uncertainty(np.zeros(shape, bool), gt, score, **kw)["mean_score_in_prediction"] is None


def test_shapes_are_checked_by_name():
    a = np.zeros((3, 4, 5), bool)
    with pytest.raises(ValueError, match=r"score \(3, 4, 4\)"):
        organ_uncertainty(a, a, np.zeros((3, 4, 4)), spacing_zyx=(1, 1, 1))
    with pytest.raises(ValueError, match=r"prob \(3, 4\)"):
        organ_uncertainty(a, a, np.zeros((3, 4, 5)), np.zeros((3, 4)), spacing_zyx=(1, 1, 1))


# -- ECE near the organ ----------------------------------------------------------------------------


def _line_case():
    """2×2 rows of 60 voxels at 0.5 mm (rows 2 and 3 mm apart): the organ is x 20..29 in every row,
    the prediction misses x 20 and 21.

    Within 2.5 mm (5 voxels) of the union: x 15..34 of each row (80 voxels). The probability is
    0.7 on the organ (all true: error 0.3), 0.2 on the other band voxels (all false: 0.2), 0
    elsewhere (exact). ECE near = (40·0.3 + 40·0.2) / 80 = 0.25; over all 240 voxels = 20 / 240.
    """
    gt = np.zeros((2, 2, 60), bool)
    gt[:, :, 20:30] = True
    pred = np.zeros_like(gt)
    pred[:, :, 22:30] = True
    prob = np.zeros(gt.shape, np.float64)
    prob[:, :, 15:35] = 0.2
    prob[gt] = 0.7
    return pred, gt, prob, (3.0, 2.0, 0.5)


def test_ece_near_organ_for_a_known_probability_map():
    pred, gt, prob, spacing = _line_case()
    r = organ_uncertainty(pred, gt, prob, prob, spacing_zyx=spacing, band_mm=2.5, num_bins=10)
    assert r["near_voxels"] == 80
    assert r["ece_near"] == pytest.approx(0.25, abs=1e-12)
    assert r["ece"] == pytest.approx(20 / 240, abs=1e-12)


def _write(arr, path, spacing_zyx):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path))
    return path


def test_evaluate_reports_near_organ_figures(tmp_path):
    pred, gt, prob, spacing = _line_case()
    unc = np.where(gt & ~pred, 0.9, 0.1).astype(np.float32)
    paths = {n: _write(a, tmp_path / f"{n}.nii.gz", spacing) for n, a in
             (("pred", pred.astype(np.uint8)), ("gt", gt.astype(np.uint8) * 3), ("prob", prob.astype(np.float32)),
              ("unc", unc))}
    r = evaluate(paths["pred"], paths["gt"], parse_label_specs(["organ=1:3"]), uncertainty=paths["unc"],
                 probabilities={"organ": paths["prob"]}, num_bins=10, band_mm=2.5, flag_threshold=0.5)
    cal = r["calibration"]["organs"]["organ"]
    assert cal["ece_near_organ"] == pytest.approx(0.25, abs=1e-6) and cal["near_organ_voxels"] == 80
    assert r["calibration"]["band_mm"] == 2.5
    o = r["uncertainty"]["organs"]["organ"]
    assert o["ece_near"] == pytest.approx(0.25, abs=1e-6) and o["ece"] == pytest.approx(20 / 240, abs=1e-6)
    assert o["auroc"] == 1.0 and o["auroc_near"] == 1.0 and o["fn_flagged"] == 1.0
    assert r["uncertainty"]["band_mm"] == 2.5 and r["uncertainty"]["flag_threshold"] == 0.5
    with pytest.raises(Exception, match="band_mm"):
        evaluate(paths["pred"], paths["gt"], band_mm=0)


# -- Spearman --------------------------------------------------------------------------------------


def test_spearman_with_ties_hand_computed():
    # average ranks: x → 1, 2.5, 2.5, 4, 5; y → 1, 2, 3.5, 3.5, 5 (both mean 3)
    # Σdx·dy = 4 + 0.5 − 0.25 + 0.5 + 4 = 8.75; Σdx² = Σdy² = 9.5 → 8.75 / 9.5
    # (the no-ties shortcut 1 − 6Σd²/(n(n²−1)) would give 0.925)
    assert spearman([1, 2, 2, 3, 4], [10, 20, 30, 30, 50]) == pytest.approx(8.75 / 9.5, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # non-finite pairs are dropped: the rest is the case above
    assert spearman([1, 2, np.nan, 2, 3, 4], [10, 20, 5, 30, 30, 50]) == pytest.approx(8.75 / 9.5, abs=1e-12)


def test_spearman_undefined_cases():
    assert spearman([1, 2], [2, 1]) is None  # fewer than 3 pairs
    assert spearman([1, 2, np.inf, None], [1, 2, 3, 4]) is None  # 2 finite pairs left
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None  # constant
    assert spearman([1, 2, 3, 4], [5, 5, 5, 5]) is None
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_prints_near_organ_line_and_rejects_a_zero_band(tmp_path, capsys):
    pred, gt, score, spacing, band_mm, _ = _ring_case()
    paths = {n: _write(a, tmp_path / f"{n}.nii.gz", spacing) for n, a in
             (("pred", pred.astype(np.uint8)), ("gt", gt.astype(np.uint8)), ("unc", score.astype(np.float32)))}
    base = ["evaluate", "--pred", str(paths["pred"]), "--gt", str(paths["gt"]), "--labels", "liver=1",
            "--uncertainty", str(paths["unc"])]
    assert main(base + ["--band-mm", "4", "--flag-threshold", "0.9"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("uncertainty near liver:"))
    assert line == "uncertainty near liver: AUROC 1.000 (within 4 mm), missed voxels flagged 100.0%"
    # without a threshold no flagged share is printed; the whole-volume AUROC is lower than near the organ
    assert main(base) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("uncertainty near liver:"))
    assert "(within 10 mm)" in line and "flagged" not in line
    for bad in ("0", "nan"):
        rc = main(base + ["--band-mm", bad])
        assert rc != 0 and "--band-mm" in capsys.readouterr().err


def test_auroc_from_one_sort_equals_pairwise_on_ties():
    """The sort-and-search AUROC (shared by all organs) against pairwise counting, many ties."""
    rng = np.random.default_rng(11)
    for n, levels in itertools.product((50, 301), (2, 5, 1000)):
        s = rng.integers(0, levels, n).astype(np.float32)
        y = rng.random(n) < 0.3
        assert auroc(s, y) == pytest.approx(_auroc_pairs(s, y), abs=1e-12)
