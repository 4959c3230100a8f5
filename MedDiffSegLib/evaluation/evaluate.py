"""Evaluate a predicted label map against a ground truth: per-organ metrics, uncertainty, calibration.

Geometry: prediction and ground truth must share the voxel grid (size, spacing, origin,
direction). The one exception is a ground truth stored on the *same physical grid* with other
axis conventions (e.g. a NIfTI label map of a DICOM series, whose rows run the other way):
every ground-truth voxel centre is then a prediction voxel centre, and the ground truth is
resampled onto the prediction grid with nearest neighbour, which only permutes voxels. Any
other difference is an error naming it (resample outside MedDiffSeg deliberately, if
intended). Uncertainty and probability maps must lie on the prediction's grid the same way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, MedDiffSegError
from ..io import array_view, read_volume
from .metrics import CONVENTIONS, OrganScore, organ_score, summarise
from .uncertainty import _auroc_sorted, _organ_uncertainty, _sorted_scores, calibration, near_band

_SPACING_TOL = 1e-4  # mm, relative to the spacing
_ORIGIN_TOL = 1e-3  # in voxels
_DIRECTION_TOL = 1e-4


@dataclass(frozen=True)
class LabelSpec:
    """One organ to evaluate: its name and its value in the prediction and in the ground truth."""

    name: str
    pred_value: int
    gt_value: int


def parse_label_specs(tokens: Sequence[str]) -> list[LabelSpec]:
    """``["liver=1", "spleen=2:1"]`` → LabelSpecs (``name=v``, or ``name=pred:gt`` for two code tables)."""
    specs: list[LabelSpec] = []
    for tok in tokens:
        name, sep, value = tok.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise MedDiffSegError(f"--labels entry {tok!r} must look like name=value or name=pred_value:gt_value")
        parts = value.split(":")
        if len(parts) not in (1, 2):
            raise MedDiffSegError(f"--labels entry {tok!r} must look like name=value or name=pred_value:gt_value")
        try:
            vals = [int(p.strip()) for p in parts]
        except ValueError:
            raise MedDiffSegError(f"--labels entry {tok!r}: label values must be integers") from None
        if any(v <= 0 for v in vals):
            raise MedDiffSegError(f"--labels entry {tok!r}: label values must be >= 1 (0 is background)")
        specs.append(LabelSpec(name, vals[0], vals[-1]))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise MedDiffSegError(f"--labels names an organ twice: {names}")
    for attr, what in (("pred_value", "prediction"), ("gt_value", "ground-truth")):
        vals = [getattr(s, attr) for s in specs]
        if len(set(vals)) != len(vals):
            raise MedDiffSegError(f"--labels uses a {what} value twice: {vals}")
    return specs


# -- geometry --------------------------------------------------------------------------------------


def _fmt(v, nd=3) -> str:
    return "(" + ", ".join(f"{x:.{nd}f}" if isinstance(x, float) else str(x) for x in v) + ")"


def geometry_differences(a: sitk.Image, b: sitk.Image) -> list[str]:
    """What differs between two images' voxel grids (empty if they share it)."""
    diffs = []
    if a.GetSize() != b.GetSize():
        diffs.append(f"size {'×'.join(map(str, a.GetSize()))} vs {'×'.join(map(str, b.GetSize()))}")
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if sa.shape != sb.shape or not np.allclose(sa, sb, rtol=_SPACING_TOL, atol=1e-6):
        diffs.append(f"spacing {_fmt(a.GetSpacing(), 4)} vs {_fmt(b.GetSpacing(), 4)} mm")
    tol = _ORIGIN_TOL * float(np.min(sa)) if sa.size else _ORIGIN_TOL
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol, rtol=0):
        diffs.append(f"origin {_fmt(a.GetOrigin())} vs {_fmt(b.GetOrigin())} mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=_DIRECTION_TOL, rtol=0):
        diffs.append(f"direction {_fmt(a.GetDirection(), 3)} vs {_fmt(b.GetDirection(), 3)}")
    return diffs


def same_physical_grid(moving: sitk.Image, reference: sitk.Image) -> bool:
    """True when every voxel centre of ``moving`` is a voxel centre of ``reference`` and vice versa.

    That is, the index map ``reference_index = A · moving_index + t`` has a signed permutation
    ``A`` and an integer ``t`` that maps the moving index box onto the reference index box.
    """
    if moving.GetDimension() != 3 or reference.GetDimension() != 3:
        return False
    dm = np.array(moving.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(moving.GetSpacing())
    dr = np.array(reference.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(reference.GetSpacing())
    try:
        inv = np.linalg.inv(dr)
    except np.linalg.LinAlgError:
        return False
    A = inv @ dm
    t = inv @ (np.array(moving.GetOrigin()) - np.array(reference.GetOrigin()))
    R = np.round(A)
    if not np.allclose(A, R, atol=1e-4) or not np.allclose(t, np.round(t), atol=1e-3):
        return False
    if not (np.abs(R).sum(axis=0) == 1).all() or not (np.abs(R).sum(axis=1) == 1).all():
        return False
    t = np.round(t).astype(int)
    ms, rs = moving.GetSize(), reference.GetSize()
    for b in range(3):  # reference axis b
        a = int(np.flatnonzero(R[b])[0])
        sign = int(R[b, a])
        if ms[a] != rs[b]:
            return False
        if (sign > 0 and t[b] != 0) or (sign < 0 and t[b] != rs[b] - 1):
            return False
    return True


def on_reference_grid(image: sitk.Image, reference: sitk.Image, what: str, ref_what: str = "the prediction"
                      ) -> tuple[sitk.Image, bool]:
    """``image`` on ``reference``'s grid: unchanged, or permuted by nearest-neighbour resampling; else InputError."""
    diffs = geometry_differences(image, reference)
    if not diffs:
        return image, False
    if same_physical_grid(image, reference):
        out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
        return out, True
    raise InputError(f"{what} and {ref_what} do not share a voxel grid: {'; '.join(diffs)}. "
                     "They must have the same size, spacing, origin and direction (or be the same physical grid "
                     "stored with other axis conventions)")


def _label_array(image: sitk.Image, shown: str) -> np.ndarray:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{shown} is not a label map (it has {image.GetNumberOfComponentsPerPixel()} components per voxel)")
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{shown} is not a label map: it holds non-integer values")
        arr = arr.astype(np.int64)
    return arr


def _read(path_or_image, what: str) -> tuple[sitk.Image, str]:
    if isinstance(path_or_image, sitk.Image):
        return path_or_image, what
    return read_volume(path_or_image), os.fspath(path_or_image)


# -- the evaluation --------------------------------------------------------------------------------


def evaluate(
    pred,
    gt,
    labels: Sequence[LabelSpec] | None = None,
    *,
    uncertainty=None,
    probabilities: dict[str, object] | None = None,
    num_bins: int = 20,
    band_mm: float = 10.0,
    flag_threshold: float | None = None,
) -> dict:
    """Evaluate ``pred`` against ``gt`` (paths or SimpleITK images); returns a JSON-ready report.

    ``labels``: the organs to score (default: every non-zero value found in either map, named
    by its value, with the same value in both). ``uncertainty``: a voxel-wise uncertainty map
    (AUROC for finding the voxels where the evaluated labels of prediction and ground truth
    differ, over all voxels and over the predicted-or-true foreground; and per organ, over all
    voxels and within ``band_mm`` mm of the organ's predicted or true voxels, with the share of
    its missed / wrongly added voxels whose uncertainty is >= ``flag_threshold``).
    ``probabilities``: organ name → mean foreground probability map (ECE per organ, over all
    voxels and within ``band_mm`` mm of the organ's predicted or true voxels).
    """
    band_mm = float(band_mm)
    if not (math.isfinite(band_mm) and band_mm > 0):
        raise MedDiffSegError(f"band_mm must be a positive number of millimetres, got {band_mm}")
    if flag_threshold is not None:
        flag_threshold = float(flag_threshold)
        if not math.isfinite(flag_threshold):
            raise MedDiffSegError(f"flag_threshold must be a finite number, got {flag_threshold}")
    pred_img, pred_shown = _read(pred, "the prediction")
    gt_img, gt_shown = _read(gt, "the ground truth")
    gt_img, resampled = on_reference_grid(gt_img, pred_img, f"the ground truth {gt_shown}", f"the prediction {pred_shown}")
    p = _label_array(pred_img, pred_shown)
    g = _label_array(gt_img, gt_shown)
    spacing_zyx = tuple(float(s) for s in reversed(pred_img.GetSpacing()))
    if labels is None:
        values = sorted((set(np.unique(p).tolist()) | set(np.unique(g).tolist())) - {0})
        labels = [LabelSpec(str(v), int(v), int(v)) for v in values]
        if not labels:
            raise MedDiffSegError("both label maps are empty: give the organs to score with --labels name=value")
    labels = list(labels)
    scores: list[OrganScore] = []
    for spec in labels:
        scores.append(organ_score(spec.name, spec.pred_value, spec.gt_value, p == spec.pred_value,
                                  g == spec.gt_value, spacing_zyx))
    report: dict = {
        "prediction": pred_shown,
        "ground_truth": gt_shown,
        "ground_truth_resampled": resampled,
        "size": list(pred_img.GetSize()),
        "spacing_mm": [float(s) for s in pred_img.GetSpacing()],
        "conventions": CONVENTIONS,
        "organs": [s.to_dict() for s in scores],
        "summary": summarise(scores),
    }
    if resampled:
        report["note"] = ("the ground truth is stored on the same physical grid with other axis conventions; "
                          "it was mapped onto the prediction grid voxel for voxel (nearest neighbour)")

    u = None
    if uncertainty is not None:
        u_img, u_shown = _read(uncertainty, "the uncertainty map")
        u_img, _ = on_reference_grid(u_img, pred_img, f"the uncertainty map {u_shown}", f"the prediction {pred_shown}")
        u = array_view(u_img)  # holds u_img: the view never outlives its voxels
        if u_img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{u_shown} must hold one value per voxel")
        if u.dtype.kind == "f" and not np.isfinite(u).all():
            raise InputError(f"{u_shown} holds NaN or infinite values")

    by_name = {s.name: s for s in labels}
    prob_maps: dict[str, tuple[np.ndarray, str]] = {}
    for name, src in (probabilities or {}).items():
        if name not in by_name:
            raise MedDiffSegError(f"probability map given for {name!r}, which is not among the evaluated organs "
                                  f"({', '.join(by_name)})")
        pr_img, pr_shown = _read(src, f"the probability map of {name}")
        pr_img, _ = on_reference_grid(pr_img, pred_img, f"the probability map {pr_shown}", f"the prediction {pred_shown}")
        prob_maps[name] = (array_view(pr_img), pr_shown)  # each view holds its own image

    bands: dict[str, np.ndarray] = {}

    def band_of(spec: LabelSpec) -> np.ndarray:
        if spec.name not in bands:
            bands[spec.name] = near_band(p == spec.pred_value, g == spec.gt_value, spacing_zyx, band_mm)
        return bands[spec.name]

    cal: dict = {}
    for name, (prob, pr_shown) in prob_maps.items():
        spec = by_name[name]
        target = g == spec.gt_value
        band = band_of(spec)
        try:
            whole = calibration(prob, target, num_bins)
            near = calibration(prob[band], target[band], num_bins)
        except ValueError as exc:
            raise InputError(f"{pr_shown}: {exc}") from None
        cal[name] = {"file": pr_shown, "ece": whole["ece"], "ece_near_organ": near["ece"],
                     "near_organ_voxels": near["voxels"], "bins": whole["bins"]}

    if u is not None:
        pi = np.zeros(p.shape, dtype=np.int16)
        gi = np.zeros(g.shape, dtype=np.int16)
        for i, spec in enumerate(labels, 1):
            pi[p == spec.pred_value] = i
            gi[g == spec.gt_value] = i
        errors = pi != gi
        fg = (pi > 0) | (gi > 0)
        sorted_u = _sorted_scores(u)  # one sort for every whole-volume AUROC below
        organs: dict = {}
        for spec in labels:
            prob = prob_maps.get(spec.name, (None, None))[0]
            organs[spec.name] = _organ_uncertainty(
                p == spec.pred_value, g == spec.gt_value, u, prob, spacing_zyx=spacing_zyx, band_mm=band_mm,
                flag_threshold=flag_threshold, num_bins=num_bins, band=band_of(spec), sorted_score=sorted_u,
                ece=cal[spec.name]["ece"] if spec.name in cal else None)
        report["uncertainty"] = {
            "file": u_shown,
            "auroc": _auroc_sorted(sorted_u, u[errors]),
            "auroc_foreground": _auroc_sorted(np.sort(u[fg]), u[fg & errors]) if fg.any() else None,
            "error_voxels": int(errors.sum()),
            "foreground_voxels": int(fg.sum()),
            "voxels": int(errors.size),
            "band_mm": band_mm,
            "flag_threshold": flag_threshold,
            "definition": "AUROC of the uncertainty for finding voxels where the evaluated labels of prediction and "
                          "ground truth differ (rank-based, ties count 1/2); 'auroc' over all voxels, "
                          "'auroc_foreground' over voxels that are foreground in the prediction or the ground truth; "
                          "null when there are no errors or no correct voxels. Per organ ('organs'): errors are the "
                          "voxels where the organ's predicted and true masks differ; 'auroc' over all voxels, "
                          "'auroc_near' within band_mm mm (Euclidean, physical spacing) of the union of the two "
                          "masks; 'ece'/'ece_near' the calibration of the organ's probability map over the same "
                          "voxels (null without one); 'fn_flagged'/'fp_flagged' the share of missed / wrongly "
                          "added voxels whose uncertainty is >= flag_threshold (null without a threshold or without "
                          "such voxels)",
            "organs": organs,
        }

    if prob_maps:
        report["calibration"] = {
            "num_bins": num_bins,
            "band_mm": band_mm,
            "definition": "expected calibration error of the mean foreground probability against the ground truth: "
                          "sum over equal-width bins of (bin share of voxels) × |mean probability − foreground "
                          "fraction|; 'ece' over all voxels, 'ece_near_organ' over the voxels within band_mm mm "
                          "(Euclidean, physical spacing) of the organ's predicted or true voxels",
            "organs": cal,
        }
    return report


# -- output ----------------------------------------------------------------------------------------


def to_json_ready(x):
    """Infinite floats → the string "inf" (JSON has no infinity); NaN → null."""
    if isinstance(x, dict):
        return {k: to_json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if math.isnan(x):
            return None
        return x
    if isinstance(x, np.integer):
        return int(x)
    return x


def _num(v, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def format_report(report: dict) -> str:
    """A readable table of the report."""
    rows = [("organ", "labels (pred:gt)", "Dice", "HD95 (mm)", "ASSD (mm)", "pred mL", "gt mL", "status")]
    for o in report["organs"]:
        status = o["status"] + (" (FAILURE)" if o["failure"] else "")
        rows.append((o["name"], f"{o['pred_label']}:{o['gt_label']}", _num(o["dice"], 4), _num(o["hd95_mm"], 2),
                     _num(o["assd_mm"], 2), _num(o["pred_volume_ml"], 1), _num(o["gt_volume_ml"], 1), status))
    s = report["summary"]
    rows.append(("mean", "", _num(s["mean_dice"], 4), _num(s["mean_hd95_mm"], 2), _num(s["mean_assd_mm"], 2), "", "",
                 f"{s['failures']} failure(s) of {s['organs']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    if "uncertainty" in report:
        u = report["uncertainty"]
        lines.append(f"uncertainty AUROC for voxel errors: {_num(u['auroc'])} (all voxels), "
                     f"{_num(u['auroc_foreground'])} (foreground); {u['error_voxels']} error voxels of {u['voxels']}")
        band = u.get("band_mm")
        for name, o in u.get("organs", {}).items():
            parts = []
            if o.get("auroc_near") is not None:
                parts.append(f"AUROC {_num(o['auroc_near'])} (within {o.get('band_mm', band):g} mm)")
            if o.get("ece_near") is not None:
                parts.append(f"ECE {_num(o['ece_near'], 4)}")
            if o.get("fn_flagged") is not None:
                parts.append(f"missed voxels flagged {100.0 * o['fn_flagged']:.1f}%")
            if not parts:
                parts.append(f"no figure (no errors or no correct voxels within {o.get('band_mm', band):g} mm)")
            lines.append(f"uncertainty near {name}: " + ", ".join(parts))
    if "calibration" in report:
        for name, c in report["calibration"]["organs"].items():
            lines.append(f"calibration {name}: ECE {_num(c['ece'], 4)} (all voxels), "
                         f"{_num(c['ece_near_organ'], 4)} (near the organ), {report['calibration']['num_bins']} bins")
    lines.append("empty masks: both empty = Dice 1, distances 0; one empty = Dice 0, distances inf, a failure")
    return "\n".join(lines)
