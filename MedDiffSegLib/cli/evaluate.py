"""``meddiffseg evaluate``: score a predicted label map against a ground truth."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

DESCRIPTION = """\
Score a predicted label map against a ground-truth label map, per organ: Dice, HD95 and
ASSD in millimetres (MONAI metrics with the physical voxel spacing), volumes, and whether
the organ is a failure. Optionally, how well an uncertainty map finds the wrong voxels
(AUROC) and how well probability maps are calibrated (ECE), over all voxels and, per organ,
within --band-mm millimetres of the organ's predicted or true voxels (whole-volume figures
of a CT are dominated by easy background far from any organ).

Both maps must share the voxel grid (size, spacing, origin, direction). A ground truth
stored on the same physical grid with other axis conventions (e.g. a NIfTI label map of a
DICOM series) is mapped onto the prediction voxel for voxel; anything else is an error
that names the difference.
"""

EPILOG = """\
empty masks (never dropped):
  both empty                    Dice 1, HD95 0, ASSD 0 (correctly absent; not a failure)
  ground truth empty, pred not  Dice 0, HD95/ASSD inf, status false_positive: a FAILURE
  pred empty, ground truth not  Dice 0, HD95/ASSD inf, status missed: a FAILURE
  Means over organs include failures, so one failure makes the mean distance inf.
  JSON writes infinity as the string "inf".

--labels:
  name=value         the same value in both maps, e.g. liver=1 spleen=2
  name=pred:gt       different code tables, e.g. liver=1:5 (prediction 1, ground truth 5)
  Without --labels every non-zero value present is scored, named by its value.

examples:
  meddiffseg evaluate --pred out/segmentation.nii.gz --gt gt.nii.gz --labels liver=1:5 spleen=2:1
  meddiffseg evaluate --pred out/segmentation.nii.gz --gt gt.nii.gz --labels liver=1:5 \\
      --uncertainty out/uncertainty.nii.gz --probabilities liver=out/probability_liver.nii.gz \\
      --json scores.json
  meddiffseg evaluate --pred seg.nii.gz --gt gt.nii.gz --labels liver=1:5 --uncertainty unc.nii.gz \\
      --band-mm 5 --flag-threshold 0.05
"""


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a segmentation against a ground truth (Dice, HD95, ASSD, AUROC, ECE)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, metavar="FILE", help="predicted label map (e.g. segmentation.nii.gz)")
    p.add_argument("--gt", required=True, metavar="FILE", help="ground-truth label map")
    p.add_argument("--labels", nargs="+", metavar="NAME=V[:G]", help="organs to score and their label values")
    p.add_argument("--uncertainty", metavar="FILE", help="voxel-wise uncertainty map (e.g. uncertainty.nii.gz)")
    p.add_argument("--probabilities", nargs="+", metavar="[NAME=]FILE",
                   help="mean foreground probability per organ: NAME=FILE, or files in --labels order")
    p.add_argument("--bins", type=int, default=20, metavar="N", help="calibration bins (default: 20)")
    p.add_argument("--band-mm", type=float, default=10.0, metavar="MM",
                   help="near-organ AUROC and ECE use the voxels within MM millimetres of the organ's predicted or "
                        "true voxels (default: 10)")
    p.add_argument("--flag-threshold", type=float, default=None, metavar="U",
                   help="uncertainty value at which a voxel counts as flagged: report the share of missed and "
                        "wrongly added voxels with uncertainty >= U (default: none)")
    p.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the table")
    p.set_defaults(func=_cmd_evaluate)


def _probability_map(tokens: list[str], labels) -> dict[str, str]:
    from ..errors import MedDiffSegError

    out: dict[str, str] = {}
    plain = [t for t in tokens if "=" not in t]
    named = [t for t in tokens if "=" in t]
    if plain and named:
        raise MedDiffSegError("--probabilities: give either NAME=FILE for every map or plain files in --labels order")
    if plain:
        if labels is None or len(plain) != len(labels):
            raise MedDiffSegError("--probabilities without names needs --labels with one organ per file "
                                  f"({len(plain)} file(s) given)")
        return {spec.name: f for spec, f in zip(labels, plain)}
    for t in named:
        name, _, path = t.partition("=")
        if name in out:
            raise MedDiffSegError(f"--probabilities names {name!r} twice")
        out[name.strip()] = path
    return out


def _cmd_evaluate(args) -> int:
    from ..errors import MedDiffSegError, OutputError
    from ..evaluation import evaluate, format_report, parse_label_specs, to_json_ready
    from ..io.volume import publish_file

    if args.bins < 1:
        raise MedDiffSegError(f"--bins must be >= 1, got {args.bins}")
    if not (math.isfinite(args.band_mm) and args.band_mm > 0):
        raise MedDiffSegError(f"--band-mm must be a positive number of millimetres, got {args.band_mm:g}")
    if args.flag_threshold is not None and not math.isfinite(args.flag_threshold):
        raise MedDiffSegError(f"--flag-threshold must be a finite number, got {args.flag_threshold:g}")
    labels = parse_label_specs(args.labels) if args.labels else None
    probs = _probability_map(args.probabilities, labels) if args.probabilities else None
    report = evaluate(args.pred, args.gt, labels, uncertainty=args.uncertainty, probabilities=probs,
                      num_bins=args.bins, band_mm=args.band_mm, flag_threshold=args.flag_threshold)
    if args.json:
        out = Path(args.json)
        tmp = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(to_json_ready(report), f, indent=2, allow_nan=False)
                f.write("\n")
            publish_file(tmp, out)  # 0644, not mkstemp's 0600
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    if not args.quiet:
        print(format_report(report))
        if args.json:
            print(f"wrote {args.json}")
    return 0
