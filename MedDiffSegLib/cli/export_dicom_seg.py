"""``meddiffseg export-dicom-seg``: a label map on a DICOM series -> DICOM-SEG (+ uncertainty Parametric Map)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError, MedDiffSegError, ModelError

DESCRIPTION = """\
Write a DICOM Segmentation (SEG) object for a label map that lies on a DICOM series, and
optionally the uncertainty map as a DICOM Parametric Map, so a PACS viewer can show both
over the images.

--seg is a label map (e.g. segmentation.nii.gz from 'meddiffseg segment') with the series'
exact voxel grid: 0 = background, label i = the i-th organ. --dicom is the folder of the
series it was computed on. Each organ becomes one segment with its SNOMED CT category and
type, colour and the model as the algorithm.
"""

EPILOG = """\
which organ is which label:
  1. --organ NAME, once per label in label order (label 1 = the first --organ), else
  2. summary.json beside --seg (written by 'meddiffseg segment'), else
  3. the model's only organ, when the model segments a single organ.
  The organs' codes and colours come from --model (default: the model named in summary.json,
  else the codes recorded in summary.json, else the default model).

segmentation type:
  BINARY by default. With --probabilities (one probability_<organ>.nii.gz per label, in label
  order, as written by 'meddiffseg segment --save-probabilities') a FRACTIONAL segmentation of
  type PROBABILITY (255 = certain) is written instead.

uncertainty:
  --uncertainty FILE --out-pmap FILE writes the uncertainty map (variance of the probability over
  the diffusion samples; dimensionless, UCUM unit "1") as a Parametric Map with 32-bit float
  pixels, in the series' frame of reference.

An empty label map (no organ voxel) is an error unless --allow-empty. Files are written under
temporary names and renamed; on any error nothing is left behind.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-dicom-seg", help="write a DICOM-SEG (and an uncertainty Parametric Map) for a DICOM series",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seg", required=True, metavar="FILE", help="label map on the series' grid (NIfTI, NRRD, MHA)")
    p.add_argument("--dicom", required=True, metavar="SERIES_DIR", help="folder holding the source DICOM series")
    p.add_argument("--out", required=True, metavar="FILE", help="DICOM-SEG file to write (e.g. segmentation.dcm)")
    p.add_argument("--model", metavar="M", help="model whose organ codes, colours, name and version describe the segments")
    p.add_argument("--organ", action="append", metavar="ORGAN",
                   help="organ of label 1, 2, ... (repeat, in label order; default: from summary.json beside --seg)")
    p.add_argument("--uncertainty", metavar="FILE", help="uncertainty map to export as a Parametric Map (needs --out-pmap)")
    p.add_argument("--out-pmap", metavar="FILE", help="Parametric Map file to write (needs --uncertainty)")
    p.add_argument("--probabilities", nargs="+", metavar="FILE",
                   help="per-organ mean probability maps, in label order: write a FRACTIONAL SEG")
    p.add_argument("--series-description", metavar="TEXT", help="Series Description of the SEG (default: MedDiffSeg <model>)")
    p.add_argument("--allow-empty", action="store_true", help="write a SEG even when no voxel is labelled")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


# -- organ metadata --------------------------------------------------------------------------------


def _read_summary(seg_path: Path) -> dict | None:
    path = seg_path.parent / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read ({exc}); pass --organ for each label instead") from None
    return summary if isinstance(summary, dict) else None


def resolve_organs(seg_path: Path, model: str | None, organ_names: list[str] | None):
    """``(organs in label order, model name, model version, where the label order came from)``."""
    from ..registry.package import Organ
    from ..registry.store import resolve_model

    summary = _read_summary(seg_path)
    summary_organs: list[dict] = []
    if summary is not None and isinstance(summary.get("organs"), list):
        summary_organs = sorted((o for o in summary["organs"] if isinstance(o, dict) and "label" in o),
                                key=lambda o: int(o["label"]))
        if [int(o["label"]) for o in summary_organs] != list(range(1, len(summary_organs) + 1)):
            raise InputError(f"{seg_path.parent / 'summary.json'} does not list labels 1..n; pass --organ for each label")
    summary_model = (summary or {}).get("model") if isinstance((summary or {}).get("model"), dict) else {}

    package = None
    if model is not None:
        package = resolve_model(model)
    elif summary_model.get("name"):
        try:
            package = resolve_model(summary_model["name"])
        except ModelError:
            package = None  # not installed here: use the codes recorded in summary.json if any

    if organ_names:
        names, origin = list(organ_names), "--organ"
    elif summary_organs:
        names, origin = [str(o["name"]) for o in summary_organs], "summary.json"
    else:
        if package is None:
            package = resolve_model(None)
        if len(package.organs) != 1:
            raise InputError(
                f"cannot tell which organ each label of {seg_path} is: no summary.json beside it. "
                f"Pass --organ NAME for each label in label order (model {package.name!r} segments: "
                f"{', '.join(package.organ_names)})")
        names, origin = [package.organs[0].name], f"model {package.name}"

    if package is not None:
        organs = [package.organs[i] for i in package.organ_ids(names)]
        return organs, package.name, package.version, origin
    recorded = {str(o.get("name")): o for o in summary_organs}
    if names and all(n in recorded and "category" in recorded[n] and "type" in recorded[n] for n in names):
        organs = [Organ.from_dict(recorded[n]) for n in names]
        return organs, str(summary_model.get("name", "MedDiffSeg")), str(summary_model.get("version", "")), origin
    package = resolve_model(None)
    organs = [package.organs[i] for i in package.organ_ids(names)]
    return organs, package.name, package.version, origin


# -- the command -----------------------------------------------------------------------------------


def run(args) -> int:
    from ..dicom.export import build_dicom_outputs
    from ..dicom.source import check_output_path, load_source_series, write_dataset_atomic
    from ..io.volume import read_volume

    if (args.uncertainty is None) != (args.out_pmap is None):
        raise MedDiffSegError("--uncertainty and --out-pmap go together: give both or neither")
    seg_path = Path(args.seg)
    out = check_output_path(args.out)
    out_pmap = check_output_path(args.out_pmap) if args.out_pmap else None
    if out_pmap is not None and out.resolve() == out_pmap.resolve():
        raise MedDiffSegError("--out and --out-pmap name the same file")
    if not Path(args.dicom).is_dir():
        raise InputError(f"{args.dicom} is not a folder: --dicom takes the folder of the source DICOM series")

    labels = read_volume(seg_path)
    organs, model_name, model_version, origin = resolve_organs(seg_path, args.model, args.organ)
    probabilities = None
    if args.probabilities:
        if len(args.probabilities) != len(organs):
            raise InputError(f"{len(args.probabilities)} --probabilities file(s) for {len(organs)} organ(s) "
                             f"({', '.join(o.name for o in organs)}): give one per label, in label order")
        probabilities = [read_volume(p) for p in args.probabilities]
    uncertainty = read_volume(args.uncertainty) if args.uncertainty else None

    source = load_source_series(args.dicom)
    seg, segments, pmap, notes = build_dicom_outputs(
        labels, source, organs, uncertainty=uncertainty, fractional_probabilities=probabilities,
        model_name=model_name, model_version=model_version or "unknown",
        series_description=args.series_description, allow_empty=args.allow_empty,
    )
    write_dataset_atomic(seg, out)
    if pmap is not None and out_pmap is not None:
        try:
            write_dataset_atomic(pmap, out_pmap)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    if not args.quiet:
        kind = "FRACTIONAL" if probabilities else "BINARY"
        print(f"wrote {out}: DICOM-SEG ({kind}, {int(seg.NumberOfFrames)} frames) on {len(source.files)} source "
              f"file(s); organs from {origin}")
        for s in segments:
            print(f"  segment {s['number']}: {s['label']} ({s['name']}), {s['voxels']} voxels")
        if pmap is not None:
            print(f"wrote {out_pmap}: Parametric Map of the uncertainty ({int(pmap.NumberOfFrames)} frames)")
        for note in notes:
            print(f"note: {note}")
    return 0
