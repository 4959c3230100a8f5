"""Evaluation metrics on synthetic cases with known answers, and against independent brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from MedDiffSegLib.evaluation import auroc, calibration, mask_metrics, organ_score, summarise


# -- Dice, HD95, ASSD ------------------------------------------------------------------------------


def test_sheets_apart_across_thick_slices_measure_in_mm():
    """Two one-voxel-thick sheets two slices apart at 5 mm slices: every surface distance is 10 mm."""
    gt = np.zeros((12, 16, 16), bool)
    pred = np.zeros_like(gt)
    gt[4, 3:13, 3:13] = True
    pred[6, 3:13, 3:13] = True
    dice, hd95, assd, status = mask_metrics(pred, gt, spacing_zyx=(5.0, 0.8, 0.8))
    assert status == "ok"
    assert dice == 0.0
    assert hd95 == pytest.approx(10.0, abs=1e-5)  # 2 slices × 5 mm, not 2 voxels
    assert assd == pytest.approx(10.0, abs=1e-5)


def test_inplane_shift_known_hd95_assd_and_dice():
    """A 20×20 sheet shifted by 2 columns at 0.5 mm: per direction 18 distances of 0, one of 0.5 and one of 1 mm.

    HD95 is the 95th percentile with linear interpolation: 0.5 + 0.05 × 0.5 = 0.525 mm;
    ASSD pools both directions: (2 × 0.5 + 2 × 1.0) / 40 = 0.075 mm; Dice = 2 × 18·20 / (2 × 400) = 0.9.
    """
    gt = np.zeros((3, 30, 30), bool)
    pred = np.zeros_like(gt)
    gt[1, 5:25, 3:23] = True
    pred[1, 5:25, 5:25] = True
    dice, hd95, assd, _ = mask_metrics(pred, gt, spacing_zyx=(3.0, 2.0, 0.5))
    # distances only along x (0.5 mm columns); rows beyond the sheet are the same in both
    assert dice == pytest.approx(0.9, abs=1e-6)
    assert hd95 == pytest.approx(0.525, abs=1e-5)
    assert assd == pytest.approx(0.075, abs=1e-5)


def _brute_force(pred, gt, spacing):
    """Independent reference: surface = mask XOR erosion (face connectivity), exhaustive distances."""
    def surface_points(m):
        edge = m ^ ndimage.binary_erosion(m)
        return np.argwhere(edge) * np.asarray(spacing)

    sp, sg = surface_points(pred), surface_points(gt)
    d = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    d_pg, d_gp = d.min(1), d.min(0)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assd = np.concatenate([d_pg, d_gp]).mean()
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    return dice, hd95, assd


@pytest.mark.parametrize("seed", [2, 3])
def test_distance_transform_gives_monais_numbers(seed):
    """The metrics read an exact distance transform; MONAI's own metrics (nearest-neighbour search over the
    surface points) give the same Dice, HD95 and ASSD on ragged masks with anisotropic spacing."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

    rng = np.random.default_rng(seed)
    shape = (14, 40, 36)
    pred = ndimage.binary_opening(rng.random(shape) < 0.35) | (rng.random(shape) < 0.02)
    gt = ndimage.binary_dilation(pred, iterations=2) ^ (rng.random(shape) < 0.05)
    spacing = (3.0, 0.8, 1.1)
    dice, hd95, assd, _ = mask_metrics(pred, gt, spacing)
    yp, yt = (torch.from_numpy(m)[None, None].float() for m in (pred, gt))
    assert dice == pytest.approx(float(DiceMetric(include_background=True)(yp, yt).item()), abs=1e-6)
    assert hd95 == pytest.approx(float(HausdorffDistanceMetric(include_background=True, percentile=95)(
        yp, yt, spacing=list(spacing)).item()), rel=1e-5)
    assert assd == pytest.approx(float(SurfaceDistanceMetric(include_background=True, symmetric=True)(
        yp, yt, spacing=list(spacing)).item()), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_match_brute_force_with_anisotropic_spacing(seed):
    rng = np.random.default_rng(seed)
    shape = (10, 24, 22)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    spacing = (4.0, 0.9, 1.3)

    def blob():
        c = rng.uniform([3, 7, 7], [7, 16, 15])
        r = rng.uniform([2, 4, 4], [4, 8, 8])
        m = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
        return m | (rng.random(shape) < 0.01)  # a few stray voxels make the tails matter

    pred, gt = blob(), blob()
    dice, hd95, assd, _ = mask_metrics(pred, gt, spacing)
    ref = _brute_force(pred, gt, spacing)
    assert dice == pytest.approx(ref[0], abs=1e-6)
    assert hd95 == pytest.approx(ref[1], rel=1e-5)
    assert assd == pytest.approx(ref[2], rel=1e-5)


def test_identical_masks():
    m = np.zeros((5, 9, 9), bool)
    m[1:4, 2:7, 2:7] = True
    assert mask_metrics(m, m, (2.0, 1.0, 1.0)) == (pytest.approx(1.0), pytest.approx(0.0), pytest.approx(0.0), "ok")


def test_empty_cases_are_explicit_and_failures_count():
    empty = np.zeros((4, 8, 8), bool)
    full = empty.copy()
    full[1:3, 2:6, 2:6] = True
    sp = (2.0, 1.0, 1.0)
    assert mask_metrics(empty, empty, sp) == (1.0, 0.0, 0.0, "both_empty")
    fp = mask_metrics(full, empty, sp)
    assert fp[0] == 0.0 and math.isinf(fp[1]) and math.isinf(fp[2]) and fp[3] == "false_positive"
    missed = mask_metrics(empty, full, sp)
    assert missed[0] == 0.0 and math.isinf(missed[1]) and math.isinf(missed[2]) and missed[3] == "missed"

    scores = [organ_score("a", 1, 1, full, full, sp), organ_score("b", 2, 2, empty, empty, sp),
              organ_score("c", 3, 3, full, empty, sp), organ_score("d", 4, 4, empty, full, sp)]
    assert [s.failure for s in scores] == [False, False, True, True]
    s = summarise(scores)
    assert s["failures"] == 2 and s["organs"] == 4
    assert s["mean_dice"] == pytest.approx(0.5)  # failures count as 0, never dropped
    assert math.isinf(s["mean_hd95_mm"]) and math.isinf(s["mean_assd_mm"])
    assert scores[0].gt_volume_ml == pytest.approx(32 * 2.0 / 1000)


# -- AUROC -----------------------------------------------------------------------------------------


def _auroc_pairs(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size)


def test_auroc_perfect_inverted_tied_and_random():
    y = np.zeros(1000, bool)
    y[::7] = True
    assert auroc(y.astype(np.float32) + 0.1, y) == 1.0
    assert auroc(-y.astype(np.float32), y) == 0.0
    assert auroc(np.zeros(1000, np.float32), y) == 0.5  # all tied: exactly chance
    rng = np.random.default_rng(0)
    r = auroc(rng.random(200_000), rng.random(200_000) < 0.1)
    assert abs(r - 0.5) < 0.01


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 400).astype(np.float32)  # heavy ties
    labels = rng.random(400) < scores / 8
    assert auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)
    assert auroc(scores.reshape(20, 20), labels.reshape(20, 20)) == pytest.approx(_auroc_pairs(scores, labels))


def test_auroc_undefined_without_both_classes():
    assert auroc(np.arange(5.0), np.zeros(5, bool)) is None
    assert auroc(np.arange(5.0), np.ones(5, bool)) is None
    with pytest.raises(ValueError):
        auroc(np.array([0.1, np.nan]), np.array([True, False]))


# -- calibration -----------------------------------------------------------------------------------


def test_ece_hand_computed():
    # bin [0.1, 0.2): 4 voxels at p = 0.15, one positive → |0.15 − 0.25| = 0.1
    # bin [0.9, 1.0]: 6 voxels at p = 1.0 (the last bin includes 1), all positive → 0
    p = np.array([0.15] * 4 + [1.0] * 6)
    t = np.array([1, 0, 0, 0] + [1] * 6, bool)
    c = calibration(p, t, num_bins=10)
    assert c["ece"] == pytest.approx(0.4 * 0.1)
    assert c["bins"][1]["voxels"] == 4 and c["bins"][9]["voxels"] == 6
    assert c["bins"][0]["voxels"] == 0 and c["bins"][0]["mean_probability"] is None


def test_ece_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(1)
    p = rng.random(400_000)
    calibrated = rng.random(p.size) < p
    assert calibration(p, calibrated, 10)["ece"] < 0.01
    assert calibration(np.round(p), calibrated, 10)["ece"] == pytest.approx(0.25, abs=0.01)


def test_ece_matches_monai_calibration_error_metric():
    from monai.metrics import CalibrationErrorMetric

    rng = np.random.default_rng(2)
    p = rng.random((1, 1, 30, 40)).astype(np.float32)
    t = rng.random(p.shape) < p ** 2
    m = CalibrationErrorMetric(num_bins=20, include_background=True, calibration_reduction="expected")
    ref = m(torch.from_numpy(p), torch.from_numpy(t.astype(np.float32))).item()
    assert calibration(p, t, 20)["ece"] == pytest.approx(ref, abs=1e-6)


def test_calibration_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match="lie in"):
        calibration(np.array([0.2, 1.5]), np.array([True, False]))
