"""How useful an uncertainty map is: AUROC for finding voxel errors, and calibration (ECE).

:func:`auroc` is the rank (Mann–Whitney) form of the area under the ROC curve: the probability
that a randomly chosen positive voxel (an error) has a higher score than a randomly chosen
negative one, ties counting one half. It is computed from the counts of positives and
negatives at each distinct score, so it is exact with ties and needs no pairwise loop:
``AUROC = Σ_v pos(v)·(neg(<v) + ½·neg(v)) / (P·N)``.

:func:`calibration` bins probabilities into ``num_bins`` equal bins ``[k/n, (k+1)/n)`` (the
last one includes 1) and reports, per bin, the voxel count, the mean probability and the
observed foreground fraction; the expected calibration error is
``ECE = Σ_b (n_b / N)·|mean_p_b − frac_b|``. This is MONAI's ``CalibrationErrorMetric``
(expected reduction) computed with exact integer counts and float64 sums: MONAI accumulates
counts in float32, which stop growing at 2^24 voxels per bin, far fewer than a CT volume has.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for detecting ``positives``; None if a class is absent."""
    s = np.asarray(scores).ravel()
    y = np.asarray(positives, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    if s.dtype.kind == "f" and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse.ravel(), weights=y.astype(np.float64), minlength=values.size)
    tot = np.bincount(inverse.ravel(), minlength=values.size).astype(np.float64)
    neg = tot - pos
    neg_below = np.cumsum(neg) - neg
    area = float(np.sum(pos * (neg_below + 0.5 * neg)))
    return area / (float(n_pos) * float(n_neg))


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
