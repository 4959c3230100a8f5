"""Per-organ overlap and surface-distance metrics in millimetres (MONAI metrics), with explicit empty cases.

For one organ, ``pred`` and ``gt`` are boolean masks ``[z, y, x]`` on the same grid and
``spacing_zyx`` the voxel size in mm in the same axis order.

- Dice: ``2|P∩G| / (|P| + |G|)``.
- HD95: the 95th percentile (linear interpolation) of the distances from every surface voxel of
  one mask to the nearest surface voxel of the other, taken in each direction; the larger of the
  two (MONAI ``HausdorffDistanceMetric(percentile=95)``'s definition).
- ASSD: the mean of the surface distances of both directions pooled together (MONAI
  ``SurfaceDistanceMetric(symmetric=True)``'s definition).

Surface voxels are the mask voxels with a background face-neighbour (``mask XOR erosion``);
distances are Euclidean in mm using the physical spacing. They are read from an exact Euclidean
distance transform of the other mask's surface (``scipy.ndimage.distance_transform_edt`` with the
spacing), which gives MONAI's numbers (``Testing/evaluation/test_metrics.py`` compares them) in time
linear in the voxels of the masks' bounding box, where MONAI's nearest-neighbour search over the
surface points took minutes for a large, ragged prediction.

Empty masks are never dropped:

- both empty → Dice 1, HD95 0, ASSD 0, status ``both_empty`` (a correct "nothing here");
- ground truth empty, prediction not → Dice 0, HD95 and ASSD infinite, status
  ``false_positive``, a failure;
- prediction empty, ground truth not → Dice 0, HD95 and ASSD infinite, status ``missed``,
  a failure.

Means over organs include failures (their Dice as 0, their distances as infinity), so a single
failure makes the mean distance infinite rather than silently better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

STATUS_OK = "ok"
STATUS_BOTH_EMPTY = "both_empty"
STATUS_MISSED = "missed"
STATUS_FALSE_POSITIVE = "false_positive"

CONVENTIONS = {
    "both_empty": "Dice 1, HD95 0 mm, ASSD 0 mm; not a failure",
    "gt_empty_pred_not": "Dice 0, HD95 and ASSD infinite; status false_positive; a failure",
    "pred_empty_gt_not": "Dice 0, HD95 and ASSD infinite; status missed; a failure",
    "hd95": "MONAI HausdorffDistanceMetric(percentile=95)'s definition: max over both directions of the 95th percentile "
            "of surface-voxel distances (mm, physical spacing)",
    "assd": "MONAI SurfaceDistanceMetric(symmetric=True)'s definition: mean of the surface distances of both "
            "directions (mm)",
    "means": "over organs, failures included (Dice 0, distances infinite)",
}


@dataclass
class OrganScore:
    name: str
    pred_label: int
    gt_label: int
    dice: float
    hd95_mm: float
    assd_mm: float
    pred_volume_ml: float
    gt_volume_ml: float
    status: str
    failure: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _crop_to_union(pred: np.ndarray, gt: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    union = pred | gt
    idx = [np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != d))) for d in range(union.ndim)]
    sl = tuple(slice(max(0, int(i[0]) - margin), int(i[-1]) + 1 + margin) for i in idx)
    return pred[sl], gt[sl]


def mask_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[float, float, float, str]:
    """``(dice, hd95_mm, assd_mm, status)`` for two boolean masks on one grid (see module doc)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {gt.shape}")
    if len(spacing_zyx) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} does not match {pred.ndim} dimensions")
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0, 0.0, 0.0, STATUS_BOTH_EMPTY
    if not g_any:
        return 0.0, math.inf, math.inf, STATUS_FALSE_POSITIVE
    if not p_any:
        return 0.0, math.inf, math.inf, STATUS_MISSED
    # Cropping to the union (plus one voxel) changes neither the overlap nor the surfaces.
    pred, gt = _crop_to_union(pred, gt)
    dice = 2.0 * int(np.count_nonzero(pred & gt)) / (int(np.count_nonzero(pred)) + int(np.count_nonzero(gt)))
    spacing = [float(s) for s in spacing_zyx]
    sp, sg = surface(pred), surface(gt)
    d_pg = distance_to(sg, spacing)[sp]  # every surface voxel of pred → the nearest surface voxel of gt
    d_gp = distance_to(sp, spacing)[sg]
    hd95 = max(float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95)))
    assd = float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size))
    return float(dice), hd95, assd, STATUS_OK


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with a background face-neighbour (``mask XOR erosion``; outside the array is background)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def distance_to(target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance in mm from every voxel to the nearest voxel of ``target`` (exact EDT)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~target, sampling=spacing)


def organ_score(name: str, pred_label: int, gt_label: int, pred_mask: np.ndarray, gt_mask: np.ndarray,
                spacing_zyx: Sequence[float]) -> OrganScore:
    dice, hd95, assd, status = mask_metrics(pred_mask, gt_mask, spacing_zyx)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    return OrganScore(name, int(pred_label), int(gt_label), dice, hd95, assd,
                      float(np.count_nonzero(pred_mask)) * voxel_ml, float(np.count_nonzero(gt_mask)) * voxel_ml,
                      status, status in (STATUS_MISSED, STATUS_FALSE_POSITIVE))


def summarise(scores: Sequence[OrganScore]) -> dict:
    """Means over organs with failures included, the number of failures and of organs."""
    if not scores:
        return {"organs": 0, "failures": 0, "mean_dice": None, "mean_hd95_mm": None, "mean_assd_mm": None}

    def mean(vals):
        vals = list(vals)
        return math.inf if any(math.isinf(v) for v in vals) else float(np.mean(vals))

    return {
        "organs": len(scores),
        "failures": sum(s.failure for s in scores),
        "mean_dice": float(np.mean([s.dice for s in scores])),
        "mean_hd95_mm": mean(s.hd95_mm for s in scores),
        "mean_assd_mm": mean(s.assd_mm for s in scores),
    }
