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
the same files as 'segment', with every correction recorded in summary.json (and, for a
result saved with --save-probabilities, its probability maps: the corrected organ's re-sampled).

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


def _numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{what} (mm), got {text!r}")
    return values


def _point(text: str) -> tuple[float, float, float]:
    return _numbers(text, 3, "a point is X,Y,Z: three finite numbers")  # type: ignore[return-value]


def _box(text: str) -> tuple[float, ...]:
    return _numbers(text, 6, "a box is X0,Y0,Z0,X1,Y1,Z1: six finite numbers")


def add_parser(sub) -> None:
    _add_refine(sub)
    _add_suggest(sub)


def _add_refine(sub) -> None:
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


SUGGEST_DESCRIPTION = """\
Where to click next: the places near an organ where the samples of a result disagree most,
ranked by the expected volume of wrong voxels there (from uncertainty.nii.gz; a result of one
sample has none: segment with --samples 5 or more). Each suggestion is a point (LPS, mm), the
kind of click (positive where the organ is probably missing, negative where it is probably
over-segmented) and a confidence: the chance that the point is wrongly labelled now.
--model-free ranks the boundary band instead (the reference, needs no uncertainty).
"""


def _add_suggest(sub) -> None:
    p = sub.add_parser("suggest", help="where to click next to correct an organ of a result",
                       description=SUGGEST_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", metavar="RESULT_DIR", help="output folder of 'meddiffseg segment' or 'refine'")
    p.add_argument("--organ", required=True)
    p.add_argument("-k", type=int, default=3, help="how many suggestions (default: 3)")
    p.add_argument("--model-free", action="store_true", help="rank the mask's boundary band, not the uncertainty")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=_cmd_suggest)


def _cmd_suggest(args) -> int:
    import json

    from ..interactive.refine import result_suggestions

    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    found = result_suggestions(args.result, args.organ, args.k, model_free=args.model_free)
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        _print_suggestions(found)
    return 0


def _print_suggestions(found: list[dict]) -> None:
    if not found:
        print("no suggestion: the samples agree everywhere near the organ (or the result has one sample)")
    for i, x in enumerate(found, start=1):
        guess = "probably organ the result misses" if x["positive"] else "probably not organ"
        print(f"{i}. look at {','.join(f'{v:.1f}' for v in x['point_mm'])} (slice {x['slice']}): {guess}; "
              f"{100 * x['confidence']:.0f}% likely wrong there, about {x['expected_wrong_ml']:.1f} mL wrong within reach")
    if found:
        print("click there with --click if it is organ, --negative-click if it is not")


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
        found = (summary.get("suggestions") or {}).get(last["organ"]) or []
        if found:
            print("where to click next:")
            _print_suggestions(found)
    return 0
