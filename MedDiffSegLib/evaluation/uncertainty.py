"""How useful an uncertainty map is: AUROC for finding voxel errors, and calibration (ECE).

:func:`auroc` is the rank (Mann–Whitney) form of the area under the ROC curve: the probability
that a randomly chosen positive voxel (an error) has a higher score than a randomly chosen
negative one, ties counting one half. It is computed from integer counts of the negatives
below and tied with each positive (one sort of all scores, then binary search), so it is exact
with ties and needs no pairwise loop: ``AUROC = Σ_v pos(v)·(neg(<v) + ½·neg(v)) / (P·N)``.
One sort serves every AUROC over the same map (all organs of a volume).

:func:`calibration` bins probabilities into ``num_bins`` equal bins ``[k/n, (k+1)/n)`` (the
last one includes 1) and reports, per bin, the voxel count, the mean probability and the
observed foreground fraction; the expected calibration error is
``ECE = Σ_b (n_b / N)·|mean_p_b − frac_b|``. This is MONAI's ``CalibrationErrorMetric``
(expected reduction) computed with exact integer counts and float64 sums: MONAI accumulates
counts in float32, which stop growing at 2^24 voxels per bin, far fewer than a CT volume has.

Near an organ: whole-volume figures of a CT are dominated by the millions of easy background
voxels far from any organ. :func:`near_band` is the set of voxels within ``band_mm`` millimetres
(Euclidean, with the anisotropic spacing) of the union of the predicted and the true mask, and
:func:`organ_uncertainty` reports AUROC and ECE inside that band beside the whole-volume ones,
and how many of the missed (false-negative) and wrongly added (false-positive) voxels the
uncertainty flags at a given threshold. :func:`spearman` correlates per-case figures (e.g. mean
uncertainty against Dice).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _sorted_scores(scores: np.ndarray) -> np.ndarray:
    """All scores, flattened and sorted (checked finite): shared by every AUROC over the same map."""
    s = np.asarray(scores).ravel()
    if s.dtype.kind == "f" and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return np.sort(s)


def _auroc_sorted(sorted_all: np.ndarray, pos_scores: np.ndarray) -> float | None:
    """AUROC from all scores (sorted) and the scores of the positives (a subset of them).

    For each positive, the negatives below it are (all below) − (positives below) and the tied
    negatives (all equal) − (positives equal); summed with integer counts, so exact with ties.
    """
    n = int(sorted_all.size)
    ps = np.sort(np.asarray(pos_scores).ravel())
    n_pos = int(ps.size)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    lt_all = np.searchsorted(sorted_all, ps, side="left").astype(np.int64)
    le_all = np.searchsorted(sorted_all, ps, side="right").astype(np.int64)
    lt_pos = np.searchsorted(ps, ps, side="left").astype(np.int64)
    le_pos = np.searchsorted(ps, ps, side="right").astype(np.int64)
    neg_below = lt_all - lt_pos
    neg_equal = (le_all - lt_all) - (le_pos - lt_pos)
    twice_area = 2 * int(neg_below.sum()) + int(neg_equal.sum())
    return twice_area / (2.0 * float(n_pos) * float(n_neg))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for detecting ``positives``; None if a class is absent."""
    s = np.asarray(scores).ravel()
    y = np.asarray(positives, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    return _auroc_sorted(_sorted_scores(s), s[y])


def calibration(prob: np.ndarray, target: np.ndarray, num_bins: int = 20) -> dict:
    """Reliability bins and ECE of foreground probabilities ``prob`` against binary ``target``."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    p = np.asarray(prob, dtype=np.float64).ravel()
    t = np.asarray(target, dtype=bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"probabilities ({p.size}) and targets ({t.size}) differ in size")
    if p.size == 0:
        return {"ece": None, "voxels": 0, "num_bins": num_bins, "bins": []}
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probabilities must lie in [0, 1], found [{p.min():.4g}, {p.max():.4g}]")
    idx = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(idx, minlength=num_bins)
    sum_p = np.bincount(idx, weights=p, minlength=num_bins)
    sum_t = np.bincount(idx, weights=t.astype(np.float64), minlength=num_bins)
    n = float(p.size)
    bins, ece = [], 0.0
    for b in range(num_bins):
        c = int(counts[b])
        if c == 0:
            bins.append({"range": [b / num_bins, (b + 1) / num_bins], "voxels": 0, "mean_probability": None,
                         "foreground_fraction": None})
            continue
        mp, ft = sum_p[b] / c, sum_t[b] / c
        ece += (c / n) * abs(mp - ft)
        bins.append({"range": [b / num_bins, (b + 1) / num_bins], "voxels": c, "mean_probability": float(mp),
                     "foreground_fraction": float(ft)})
    return {"ece": float(ece), "voxels": int(p.size), "num_bins": num_bins, "bins": bins}


# -- near the organ --------------------------------------------------------------------------------


def _check_spacing(spacing_zyx, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(v) for v in spacing_zyx)
    if len(sp) != ndim:
        raise ValueError(f"spacing_zyx has {len(sp)} values for a {ndim}-D volume")
    if not all(math.isfinite(v) and v > 0 for v in sp):
        raise ValueError(f"spacing_zyx must be positive and finite, got {sp}")
    return sp


def near_band(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing_zyx: Sequence[float],
              band_mm: float = 10.0) -> np.ndarray:
    """Voxels within ``band_mm`` mm (Euclidean, physical spacing) of the union of the two masks.

    The mask voxels themselves are included (distance 0). The distance transform runs only on
    the bounding box of the union padded by ``ceil(band_mm / spacing)`` voxels per axis (clipped
    to the volume): no voxel outside it can be within ``band_mm``, and every voxel of the union
    lies inside it, so the distances there are exact. Both masks empty → all False.
    """
    pred = np.asarray(pred_mask, dtype=bool)
    gt = np.asarray(gt_mask, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_mask shape {pred.shape} and gt_mask shape {gt.shape} differ")
    sp = _check_spacing(spacing_zyx, pred.ndim)
    band_mm = float(band_mm)
    if not (math.isfinite(band_mm) and band_mm >= 0):
        raise ValueError(f"band_mm must be a finite number >= 0, got {band_mm}")
    union = pred | gt
    out = np.zeros(union.shape, dtype=bool)
    if union.ndim == 0 or not union.any():
        return out
    box = []
    for ax in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != ax)
        idx = np.flatnonzero(union.any(axis=other) if other else union)
        pad = int(math.ceil(band_mm / sp[ax]))
        box.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, union.shape[ax])))
    box = tuple(box)
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(~union[box], sampling=sp)
    out[box] = dist <= band_mm
    return out


def organ_uncertainty(pred_mask: np.ndarray, gt_mask: np.ndarray, score: np.ndarray, prob: np.ndarray | None = None,
                      *, spacing_zyx: Sequence[float], band_mm: float = 10.0, flag_threshold: float | None = None,
                      num_bins: int = 20) -> dict:
    """Uncertainty ``score`` and probability ``prob`` of one organ judged over all voxels and near the organ.

    Errors are the voxels where ``pred_mask`` and ``gt_mask`` differ; "near" is
    :func:`near_band` of the two masks. Keys: ``auroc`` / ``auroc_near`` (score for finding the
    errors, all voxels / inside the band), ``ece`` / ``ece_near`` (calibration of ``prob``
    against ``gt_mask``; None without ``prob``), ``error_voxels``, ``error_voxels_near``,
    ``near_voxels``, ``false_negative_voxels`` (gt and not pred), ``false_positive_voxels``,
    ``fn_flagged`` / ``fp_flagged`` (fraction of those with ``score >= flag_threshold``; None
    without a threshold or without such voxels), ``mean_score_in_prediction`` (None if the
    prediction is empty), ``mean_score_near`` (None if the band is empty), ``band_mm``,
    ``flag_threshold``.
    """
    return _organ_uncertainty(pred_mask, gt_mask, score, prob, spacing_zyx=spacing_zyx, band_mm=band_mm,
                              flag_threshold=flag_threshold, num_bins=num_bins)


_UNSET = object()


def _organ_uncertainty(pred_mask, gt_mask, score, prob=None, *, spacing_zyx, band_mm=10.0, flag_threshold=None,
                       num_bins=20, band=None, sorted_score=None, ece=_UNSET) -> dict:
    """:func:`organ_uncertainty`, reusing what the caller already has: the band, the sorted scores, the ECE."""
    pred = np.asarray(pred_mask, dtype=bool)
    gt = np.asarray(gt_mask, dtype=bool)
    s = np.asarray(score)
    shapes = {"pred_mask": pred.shape, "gt_mask": gt.shape, "score": s.shape}
    if prob is not None:
        prob = np.asarray(prob)
        shapes["prob"] = prob.shape
    if len(set(shapes.values())) != 1:
        raise ValueError("shapes differ: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    if s.dtype.kind not in "biuf":
        raise ValueError(f"score must be numeric, got dtype {s.dtype}")
    if flag_threshold is not None:
        flag_threshold = float(flag_threshold)
        if not math.isfinite(flag_threshold):
            raise ValueError(f"flag_threshold must be finite, got {flag_threshold}")
    if sorted_score is None:
        sorted_score = _sorted_scores(s)
    elif sorted_score.size != s.size:
        raise ValueError(f"sorted_score has {sorted_score.size} values for a score of {s.size}")
    if band is None:
        band = near_band(pred, gt, spacing_zyx, band_mm)
    elif band.shape != pred.shape:
        raise ValueError(f"band shape {band.shape} and pred_mask shape {pred.shape} differ")
    errors = pred != gt
    fn = gt & ~pred
    fp = pred & ~gt
    s_near = s[band]

    def flagged(mask):
        if flag_threshold is None or not mask.any():
            return None
        return float(np.count_nonzero(s[mask] >= flag_threshold) / np.count_nonzero(mask))

    def mean(values):
        return float(np.mean(values, dtype=np.float64)) if values.size else None

    if prob is None:
        ece_all = ece_near = None
    else:
        ece_all = calibration(prob, gt, num_bins)["ece"] if ece is _UNSET else ece
        ece_near = calibration(prob[band], gt[band], num_bins)["ece"]
    return {
        "auroc": _auroc_sorted(sorted_score, s[errors]),
        "auroc_near": auroc(s_near, errors[band]) if s_near.size else None,
        "ece": ece_all,
        "ece_near": ece_near,
        "error_voxels": int(np.count_nonzero(errors)),
        "error_voxels_near": int(np.count_nonzero(errors & band)),
        "near_voxels": int(np.count_nonzero(band)),
        "false_negative_voxels": int(np.count_nonzero(fn)),
        "false_positive_voxels": int(np.count_nonzero(fp)),
        "fn_flagged": flagged(fn),
        "fp_flagged": flagged(fp),
        "mean_score_in_prediction": mean(s[pred]),
        "mean_score_near": mean(s_near),
        "band_mm": float(band_mm),
        "flag_threshold": flag_threshold,
    }


# -- across cases ----------------------------------------------------------------------------------


def spearman(x, y) -> float | None:
    """Spearman rank correlation of paired values (average ranks for ties), over the finite pairs.

    None when fewer than 3 finite pairs remain or either side is constant over them.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x ({a.size} values) and y ({b.size} values) differ in length")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)  # average ranks for ties
    return float(np.corrcoef(ra, rb)[0, 1])
