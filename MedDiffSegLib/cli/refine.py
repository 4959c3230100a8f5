"""``meddiffseg refine``: correct one organ of a result with clicks and a box."""

from __future__ import annotations

import argparse
import math
import re

from ..errors import InputError

DESCRIPTION = """\
Correct one organ of an earlier result (the output folder of 'meddiffseg segment' or of an
earlier 'refine') with clicks: --click marks a point that belongs to the organ, --negative-click
one that does not, --box the region the organ lies in. The model re-samples the organ on the
slices the correction reaches (within the model's click radius of a click, and the box's
slices), following the change from slice to slice, and writes the corrected result to --out:
the same files as 'segment', with every correction recorded in summary.json.

Points are world coordinates in millimetres in the LPS convention, as SimpleITK and ITK
report them (3D Slicer shows RAS: negate its first two numbers).
"""

EPILOG = """\
rules:
  A correction of one organ never changes another organ: the organ takes only background
  voxels and gives voxels back to background. An organ named with --lock (or locked in the
  result) is never changed; refining it is an error. Clicks accumulate: the clicks of earlier
  corrections of the same organ are used again. The model must be trained for interactive
  correction (its card says so).

examples:
  meddiffseg refine out/ct --organ pancreas --click 12.5,-180.2,-410 --out out/ct-r1
  meddiffseg refine out/ct-r1 --organ pancreas --negative-click 40,-170,-405 --out out/ct-r2
  meddiffseg refine out/ct --organ gallbladder --box 30,-200,-420,70,-160,-380 --out out/ct-r1
"""


def _point(text: str) -> tuple[float, float, float]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"a point is X,Y,Z in mm (three finite numbers), got {text!r}")
    return values  # type: ignore[return-value]


def _box(text: str) -> tuple[float, ...]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"a box is X0,Y0,Z0,X1,Y1,Z1 in mm (six finite numbers), got {text!r}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("refine", help="correct one organ of a result with clicks and a box",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", metavar="RESULT_DIR", help="output folder of 'meddiffseg segment' or 'refine'")
    p.add_argument("--organ", required=True, help="the organ to correct (as in the result)")
    p.add_argument("--click", dest="positive", action="append", type=_point, default=[], metavar="X,Y,Z",
                   help="a point of the organ (LPS, mm); repeat for several")
    p.add_argument("--negative-click", dest="negative", action="append", type=_point, default=[], metavar="X,Y,Z",
                   help="a point that is not the organ (LPS, mm); repeat for several")
    p.add_argument("--box", type=_box, metavar="X0,Y0,Z0,X1,Y1,Z1", help="two opposite corners (LPS, mm)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the corrected result")
    p.add_argument("--image", metavar="PATH",
                   help="the image the result was made from (default: the one recorded in its summary.json)")
    p.add_argument("--model", metavar="M", help="the model (default: the one recorded, checked by its sha256)")
    p.add_argument("--lock", action="append", default=[], metavar="ORGAN", help="an organ that must not change")
    p.add_argument("--samples", type=int, metavar="N", help="samples per correction (default: the result's)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default: the result's)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}", help="compute device (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_refine)
    # LPS points often start with a minus sign ("--click -186,-77.5,325"): let argparse read such a
    # value as a value, as it does for a plain negative number, not as an unknown option.
    p._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")


def _cmd_refine(args) -> int:
    from ..interactive.refine import run_refine
    from .main import _CancelOnInterrupt

    if not args.positive and not args.negative and args.box is None:
        raise InputError("give at least one --click, --negative-click or --box")
    with _CancelOnInterrupt() as cancel:
        summary = run_refine(args.result, args.out, args.organ, positive=args.positive, negative=args.negative,
                             box=args.box, image=args.image, model=args.model, device=args.device,
                             samples=args.samples, seed=args.seed, precision=args.precision, locked=args.lock,
                             should_cancel=cancel)
    if not args.quiet:
        last = summary["interactions"][-1]
        entry = next(o for o in summary["organs"] if o["name"] == last["organ"])
        slices = last["slices"]
        where = f"slices {min(slices)}-{max(slices)}" if slices else "no slice"
        print(f"{entry['display_name']}: {last['changed_voxels']} voxels changed on {where} "
              f"(axis {last['slice_axis']}); now {entry['volume_ml']:.1f} mL; "
              f"{len(summary['interactions'])} correction(s) recorded; {last['seconds']:.2f} s")
        print(f"wrote {args.out}/segmentation.nii.gz, uncertainty.nii.gz, summary.json")
    return 0
