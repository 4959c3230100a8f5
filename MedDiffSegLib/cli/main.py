"""The ``meddiffseg`` command line (also ``python -m MedDiffSegLib``).

Each subcommand is added by an ``_add_<name>(subparsers)`` function that sets ``func`` on its
parser; ``func(args) -> int`` does the work. :func:`main` turns every
:class:`~MedDiffSegLib.errors.MedDiffSegError` into one line ``meddiffseg: error: <message>``
on stderr and returns the error's exit code; anything else is a bug and keeps its traceback.
Heavy imports (torch, SimpleITK) happen inside the subcommands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Callable, Sequence

from .. import __version__
from ..errors import Cancelled, DeviceError, InputError, MedDiffSegError, ModelError, OutputError, PacsError
from ..modality import DEFAULT_MODELS, MODALITIES

#: The environment variable of the catalogue's base URL (the same as registry.catalogue.CATALOGUE_URL_ENV; a test checks).
CATALOGUE_URL_ENV = "MEDDIFFSEG_CATALOGUE_URL"

PROG = "meddiffseg"
#: Samples per organ when --samples is not given: the 3D Slicer module's default "Standard" preset, so that a
#: plain run has an uncertainty map (1 sample cannot disagree with itself). On the test patients 5 one-step
#: samples find errors near the organ about as well as 10 (docs/uncertainty.md); a one-organ run on a 2-core
#: CPU is about 1.5x the time of 1 sample (README "How long it takes").
DEFAULT_SAMPLES = 5
DEFAULT_SCHEDULERS = ("ddim", "euler_ancestral", "dpmsolver++", "unipc", "ddpm", "lms")

EXIT_CODES_TEXT = f"""\
exit codes:
  0    success
  1    invalid option value (e.g. --samples 0) or another user error
  2    input problem: missing, unreadable, not 3D, empty or mixed DICOM folder, a file
       without --model or --modality (no modality known), a DICOM series that is not
       CT or MR (also used by command-line syntax errors)
  {ModelError.exit_code}    model problem: not installed, corrupt (sha256 mismatch), unknown organ,
       made for another modality than the input (see --allow-modality-mismatch)
  {DeviceError.exit_code}    device problem: e.g. --device cuda without a usable GPU
  {OutputError.exit_code}    output folder cannot be created or written
  {PacsError.exit_code}    PACS unreachable, refused the association or did not store every instance
  {Cancelled.exit_code}  cancelled (Ctrl-C); no output files are left behind
"""
assert InputError.exit_code == 2  # the text above says so

SEGMENT_DESCRIPTION = """\
Segment one or more organs in a CT or MRI volume with a diffusion model and write
the label map, a voxel-wise uncertainty map and a JSON summary.

INPUT is a volume file (.nii/.nii.gz, .nrrd, .mha/.mhd) or a folder holding exactly
one DICOM series. The input is only read, never modified.

Without --model, the default model for the input's modality is used: a DICOM series
says its modality (Modality tag); for a file, pass --modality CT or --modality MR.
"""

SEGMENT_EPILOG = f"""\
how it works:
  A diffusion model does not output one mask: it draws masks from a distribution,
  starting from random noise conditioned on the image. --samples N draws N masks per
  organ; their mean is the probability (thresholded into the segmentation) and their
  disagreement is the uncertainty. More samples give a smoother probability and a more
  reliable uncertainty map at up to N times the network time; 1 sample gives a
  segmentation but no uncertainty (an all-zero map). The default is 5 samples, the
  3D Slicer module's Standard preset: about 1.5x the time of 1 sample for one organ
  on a 2-core CPU; --samples 1 is the fastest run. --steps K is the number of
  denoising steps of each reverse run: more steps cost more time, and some models
  (trained for a single-step reverse) do not improve with more; its default comes
  from the model ('meddiffseg models info MODEL'). --seed fixes the random noise: the same input,
  model, options, seed and device give the same result on CPU.

outputs (in --out DIR; all images have the input's exact voxel grid: size, spacing,
origin and direction, so they overlay the input voxel for voxel in any viewer):
  segmentation.nii.gz          uint8 labels: 0 background, 1..n the --organ values in
                               the order given
  uncertainty.nii.gz           float32 variance of the organ's probability over the
                               samples (0 = all samples agree)
  probability_<organ>.nii.gz   float32 mean foreground probability per organ
                               (only with --save-probabilities)
  segmentation.dcm             DICOM-SEG derived from the input series, one segment per
                               organ (only with --dicom-seg; INPUT must be a DICOM folder)
  uncertainty_pmap.dcm         the uncertainty as a DICOM Parametric Map (with --dicom-seg)
  summary.json                 per organ: label, volume in mL, mean uncertainty inside
                               the mask, the axial slice with the highest uncertainty
                               (0-based voxel index along the IJK axis slice_axis_ijk,
                               I, J or K as in ITK and 3D Slicer; K for an axial scan;
                               slice_axis is the same axis in numpy order, 0 = K);
                               timings; model name/version/sha256; settings; software
                               versions; input size, spacing and modality; the
                               modality check. No patient names, IDs, dates or
                               other DICOM tags are written.
  Files are written under temporary names and renamed at the end: a failed or
  cancelled run leaves no output (and removes DIR if the run created it). Existing
  files of the same names in DIR are replaced.

modality:
  Every model is made for CT or for MR ('meddiffseg models' lists it). The input's
  modality is the DICOM Modality tag of a series (CT or MR; other modalities are
  refused), else --modality. Without --model the default model for that modality is
  used (a file without --modality is refused: nothing is guessed). Before the model
  runs, the input's intensities are checked against its tag or --modality, both ways:
  intensities implausible as Hounsfield units (a CT has fat and air at -50 HU and below
  in at least 5% of its voxels; an MR has none) contradict CT, intensities plausible
  as HU contradict MR. A model refuses an input tagged or declared the other modality;
  without a tag or --modality, a CT model refuses intensities implausible as HU and an
  MR model intensities that look like HU. The error says what the input probably is,
  the flag to use (--modality CT|MR or --model) and the installed models that fit;
  --allow-modality-mismatch runs the model anyway (with a warning, recorded in
  summary.json as modality_check.overridden).

devices:
  auto   a CUDA GPU when PyTorch sees one, otherwise the CPU (default)
  cpu    always the CPU
  cuda   the first CUDA GPU (cuda:N for another); an error if none is usable

{EXIT_CODES_TEXT}
examples:
  meddiffseg segment ct.nii.gz --modality CT --organ liver --organ spleen --out results/ --samples 10
  meddiffseg segment dicom/series1/ --organ liver --out results/   (modality from the DICOM tag)
  meddiffseg segment mr.nii.gz --model abdomen-mr --organ liver --out results/
"""

MODELS_DESCRIPTION = f"""\
List, inspect, install, update and remove model packages. Without a subcommand: list.

A model package is a folder with model.json (method, organs, preprocessing,
provenance, metrics, weights sha256) and weights.safetensors. Packages are found in
  - the built-in folder shipped with MedDiffSeg, and
  - the user folder $MEDDIFFSEG_HOME/models (default ~/.meddiffseg/models).
A user package with the same name as a built-in one takes precedence.
Installing takes the name of a package in the model catalogue ('models catalogue'
lists them), a local zip or an http(s) URL (a URL needs --sha256, the zip's
published hash, checked before the archive is opened): the zip is checked (no unsafe
paths or links), the weights are verified against model.json, then the package is
moved into the user folder in one step. 'update' replaces an installed model by a
newer version of it; 'remove' deletes a user package (built-in ones cannot be removed).

The catalogue's zips are downloaded from its base URL: --catalogue-url, else
${CATALOGUE_URL_ENV}, else the setting ('models catalogue --set-url URL', kept in
$MEDDIFFSEG_HOME/settings.json), else the catalogue's own (a placeholder until a
release server exists). Point it at a hospital's mirror of the zips for offline networks.

examples:
  {PROG} models catalogue
  {PROG} models install abdomen-ct-dts
  {PROG} models info abdomen-ct-guided --verify
  {PROG} models install https://example.org/abdomen-mr-0.2.0.zip --sha256 HEX
  {PROG} models update abdomen-mr https://example.org/abdomen-mr-0.3.0.zip --sha256 HEX
  {PROG} models remove abdomen-mr
"""


def _schedulers() -> tuple[str, ...]:
    # A static list keeps '--help' free of the torch import; a test checks it matches
    # MedDiffSegLib.sampling.schedulers.SCHEDULERS, and the pipeline validates again.
    return DEFAULT_SCHEDULERS


# -- output helpers ------------------------------------------------------------------------------


def _one_line(msg: str) -> str:
    """Fold a multi-line message (e.g. a list of DICOM series) into one line."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return lines[0] + " " + "; ".join(ln.lstrip("-* ").strip() for ln in lines[1:])


def _err(msg: str) -> None:
    print(f"{PROG}: error: {_one_line(msg)}", file=sys.stderr)


class _StderrLogHandler(logging.Handler):
    """Library warnings as ``meddiffseg: warning: ...`` lines (resolved against the current stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"{PROG}: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


def _setup_logging() -> None:
    logger = logging.getLogger("MedDiffSegLib")
    if not any(isinstance(h, _StderrLogHandler) for h in logger.handlers):
        logger.addHandler(_StderrLogHandler(logging.WARNING))
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


class _Progress:
    """A tqdm bar on stderr driven by the engine's ``progress(stage, fraction, message)`` callback."""

    STAGE_TEXT = {"read": "reading", "load": "loading model", "preprocess": "preprocessing",
                  "network": "sampling", "postprocess": "postprocessing", "write": "writing",
                  "download": "downloading", "verify": "verifying", "extract": "extracting", "install": "installing"}

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, leave=False, dynamic_ncols=True,
                            bar_format="{desc:<16}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        self.stage: str | None = None

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if self.bar is None:
            return
        if stage != self.stage:
            self.stage = stage
            self.bar.set_description_str(self.STAGE_TEXT.get(stage, stage), refresh=False)
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.bar.n = int(round(fraction * 1000))
        self.bar.set_postfix_str(message or "", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _CancelOnInterrupt:
    """First Ctrl-C asks the run to stop cleanly (Cancelled); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{PROG}: cancelling (press Ctrl-C again to stop immediately)...", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


# -- segment -------------------------------------------------------------------------------------


def add_run_options(p, *, modality_help: str, dicom_seg_needs: str) -> None:
    """The options of one segmentation run after INPUT, --organ and --out (segment and batch share them)."""
    p.add_argument("--model", metavar="M",
                   help="installed model name or path to a model package folder (default: the default model "
                        "for the input's modality, see 'meddiffseg models')")
    p.add_argument("--modality", type=str.upper, choices=MODALITIES,
                   help=modality_help)
    p.add_argument("--allow-modality-mismatch", action="store_true",
                   help="run the model even when it is made for another modality than the input "
                        "(tag, --modality or intensities implausible as CT Hounsfield units); a warning is printed")
    p.add_argument("--samples", type=int, metavar="N",
                   help=f"diffusion samples per organ; uncertainty needs N >= 2 (default: {DEFAULT_SAMPLES}, the "
                        "Slicer module's Standard preset; 1 is fastest, without an uncertainty map)")
    p.add_argument("--steps", type=int, metavar="K", help="denoising steps per sample (default: the model's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed for reproducible results (default: 0)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="compute device: auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--scheduler", choices=_schedulers(),
                   help="reverse-diffusion scheduler (default: the model's)")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="draw all N samples in every window (default: an organ whose first sample shows no "
                        "trace of it in a window gets no more samples there; summary.json says how many were drawn)")
    p.add_argument("--body-crop", dest="crop_body", action=argparse.BooleanOptionalAction, default=None,
                   help="cut the windows to the body's in-plane box (faster where the body is smaller than the "
                        "field of view; the shipped models lose accuracy with it, so the default is the model's "
                        "own setting, off for them)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="network arithmetic: auto (GPU: bf16 or fp16; CPU: the model's choice, fp32 unless it "
                        "was validated in bf16 and the CPU has native bf16), fp32, bf16, fp16 (GPU only)")
    p.add_argument("--staple", action="store_true",
                   help="fuse the samples with SimpleITK's STAPLE instead of thresholding their mean")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest connected component of each organ (default: the model's own "
                        "choice per organ, made on held-out training patients; none for models without one)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write probability_<organ>.nii.gz (float32 mean probability)")
    p.add_argument("--dicom-seg", nargs="?", const="binary", choices=("binary", "fractional"),
                   help="also write segmentation.dcm (DICOM-SEG, BINARY by default or FRACTIONAL mean "
                        "probabilities) and uncertainty_pmap.dcm (Parametric Map); " + dicom_seg_needs)


def _add_segment(sub) -> None:
    p = sub.add_parser(
        "segment", help="segment organs in a CT/MRI volume or DICOM series",
        description=SEGMENT_DESCRIPTION, epilog=SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="volume file (NIfTI, NRRD, MHA) or a folder with one DICOM series")
    p.add_argument("--organ", action="append", required=True, metavar="ORGAN",
                   help="organ to segment (repeat for several; label i = the i-th --organ), or 'all' for every "
                        "organ of the model in its order. Names as listed by 'meddiffseg models info MODEL', e.g. liver")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_run_options(
        p, modality_help="what INPUT is: CT or MR. Needed without --model for a file (NIfTI, NRRD, MHA have "
                         "no modality tag); a DICOM series' Modality tag is used without it",
        dicom_seg_needs="INPUT must be a DICOM folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no result table")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args) -> int:
    from ..inference.pipeline import run_segment

    show_bar = not args.quiet and sys.stderr.isatty()
    bar = _Progress(show_bar)
    try:
        with _CancelOnInterrupt() as cancel:
            summary = run_segment(
                args.input, args.out, args.organ, model=args.model,
                samples=DEFAULT_SAMPLES if args.samples is None else args.samples, steps=args.steps,
                seed=args.seed, device=args.device, scheduler=args.scheduler, staple=args.staple,
                largest_component=args.largest_component, save_probabilities=args.save_probabilities,
                progress=bar, should_cancel=cancel, dicom_seg=args.dicom_seg,
                modality=args.modality, allow_modality_mismatch=args.allow_modality_mismatch,
                adaptive=args.adaptive, crop_body=args.crop_body, precision=args.precision,
            )
    finally:
        bar.close()
    if not args.quiet:
        _print_segment_result(summary, args.out)
    return 0


def _print_segment_result(summary: dict, out: str) -> None:
    from pathlib import Path

    out_dir = Path(out)
    files = [summary["outputs"]["segmentation"], summary["outputs"]["uncertainty"],
             *summary["outputs"]["probabilities"].values(),
             *(summary["outputs"][k] for k in ("dicom_seg", "uncertainty_pmap") if k in summary["outputs"]),
             "summary.json"]
    print(f"wrote {', '.join(str(out_dir / f) for f in files)}")
    s = summary["settings"]
    one_sample = int(s.get("samples") or 0) == 1
    rows = [("label", "organ", "volume (mL)", "mean uncertainty", "most uncertain slice (IJK)")]
    for o in summary["organs"]:
        mu = "-" if o["mean_uncertainty"] is None or one_sample else f"{o['mean_uncertainty']:.4f}"
        sl = "-" if o["max_uncertainty_slice"] is None else _slice_text(o, o["max_uncertainty_slice"])
        rows.append((str(o["label"]), o["display_name"], f"{o['volume_ml']:.1f}", mu, sl))
    _print_table(rows)
    if one_sample:
        print(f"no uncertainty map: 1 sample cannot disagree with itself, so {summary['outputs']['uncertainty']} is "
              f"all zeros; run with --samples {DEFAULT_SAMPLES} (the default) or more for one")
    from ..uncertainty.continuation import describe_run

    for o in summary["organs"]:  # where an organ probably continues unsegmented (the samples agree there)
        for run in o.get("possible_continuation") or []:
            print(f"review {o['display_name']}: {describe_run(run, o.get('slice_axis_ijk'))}")
    check = summary.get("modality_check") or {}
    source = {"dicom": "its DICOM tag", "declared": "--modality", "intensities": "its intensities"}
    inp = summary.get("input", {})
    modality = summary["model"].get("modality", "?") + " model; input " + (
        f"{inp['modality']} from {source.get(inp.get('modality_source'), inp.get('modality_source'))}"
        if inp.get("modality") else "of unknown modality")
    if check.get("overridden"):
        modality += ", modality mismatch overridden"
    drawn = ""
    sampling = summary.get("sampling") or {}
    if sampling.get("adaptive"):  # how many samples the ensemble really drew, per window, per organ
        per = [o["samples_per_window"] for o in sampling["organs"].values()]
        drawn = f" (adaptive: {min(per):.1f}-{max(per):.1f} drawn per window)" if len(per) > 1 and min(per) != max(per) \
            else f" (adaptive: {per[0]:.1f} drawn per window)"
    print(f"model {summary['model']['name']} {summary['model']['version']} ({modality}); {s['samples']} sample(s){drawn}, "
          f"{s['steps']} step(s), seed {s['seed']}; {s['device']}, {s.get('precision', 'fp32')}; "
          f"{summary['timings_s']['total']:.1f} s")


def _slice_text(organ: dict, index: int) -> str:
    """A slice index with its IJK axis, e.g. "K 57" (just the index for a summary without the axis)."""
    axis = organ.get("slice_axis_ijk")
    return f"{axis} {index}" if axis else str(index)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- models --------------------------------------------------------------------------------------


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list, inspect, install, update and remove model packages",
                       description=MODELS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_cmd_models_list)
    msub = p.add_subparsers(dest="models_command", metavar="{list,info,catalogue,install,update,remove}")

    pl = msub.add_parser("list", help="list installed models (name, version, method, organs, where)")
    pl.add_argument("--json", action="store_true", help="print the list as JSON")
    pl.set_defaults(func=_cmd_models_list)

    pi = msub.add_parser("info", help="show a model: method, modality, organs, data, scores, where its card is",
                         description="Show a model in short lines: name, method, modality, organs, input, training "
                                     "data, scores and where its model card is. NAME is an installed model name or "
                                     "a package folder. --json prints the full record (model.json).")
    pi.add_argument("name", metavar="NAME")
    pi.add_argument("--json", action="store_true", help="print the full record (model.json) as JSON")
    pi.add_argument("--verify", action="store_true", help="also check the weights file against its sha256")
    pi.set_defaults(func=_cmd_models_info)

    pc = msub.add_parser(
        "catalogue", help="list the packages of the model catalogue; set its base URL (a mirror)",
        description="List the packages of the model catalogue (published as zips, installed with 'models install "
                    "NAME'): name, version, method, modality, size, whether installed; and the base URL their zips "
                    f"are downloaded from, with where it comes from (--catalogue-url, ${CATALOGUE_URL_ENV}, the "
                    "setting, or the catalogue's own). --set-url stores a base URL in $MEDDIFFSEG_HOME/settings.json "
                    "(a hospital's mirror of the zips), --unset-url removes it.")
    pc.add_argument("--json", action="store_true", help="print the catalogue as JSON")
    pc.add_argument("--set-url", metavar="URL", help="store URL as the catalogue's base URL (a mirror)")
    pc.add_argument("--unset-url", action="store_true", help="remove the stored base URL")
    pc.set_defaults(func=_cmd_models_catalogue)

    pz = msub.add_parser(
        "install", help="install a model package from the catalogue (by name), a local zip or an http(s) URL",
        description="Install a model package into $MEDDIFFSEG_HOME/models (default ~/.meddiffseg/models): a package "
                    "of the model catalogue by NAME ('meddiffseg models catalogue' lists them; downloaded from the "
                    "catalogue's base URL and checked against the catalogue's size and sha256), a local zip or an "
                    "http(s) URL. The zip holds model.json and weights.safetensors, at its root or in one top-level "
                    "folder. A URL needs --sha256 (the zip's hash, published with it); the download is checked "
                    "against it before anything is unpacked.",
    )
    pz.add_argument("zip", metavar="NAME_ZIP_OR_URL",
                    help="name of a catalogue package, path of a package zip, or its http(s) URL")
    pz.add_argument("--sha256", metavar="HEX", help="expected sha256 of the zip file (required for a URL)")
    pz.add_argument("--catalogue-url", metavar="URL",
                    help=f"base URL of the catalogue's zips for this install (default: ${CATALOGUE_URL_ENV}, "
                         "the setting, else the catalogue's own)")
    pz.add_argument("--force", action="store_true", help="replace an installed user package of the same name")
    pz.set_defaults(func=_cmd_models_install)

    pu = msub.add_parser(
        "update", help="replace an installed model by a newer version (zip or URL)",
        description="Replace installed model NAME by the package in ZIP_OR_URL, which must hold the same model "
                    "in a newer version. It goes to the user folder (a built-in model is shadowed, not changed).",
    )
    pu.add_argument("name", metavar="NAME", help="installed model name")
    pu.add_argument("source", metavar="ZIP_OR_URL", help="path of the new package zip, or its http(s) URL")
    pu.add_argument("--sha256", metavar="HEX", help="expected sha256 of the zip file (required for a URL)")
    pu.add_argument("--allow-downgrade", action="store_true", help="install it even when it is not newer")
    pu.set_defaults(func=_cmd_models_update)

    pr = msub.add_parser("remove", help="delete an installed user model (built-in models cannot be removed)",
                         description="Delete user model NAME from $MEDDIFFSEG_HOME/models. A built-in model of "
                                     "the same name, if any, is used again.")
    pr.add_argument("name", metavar="NAME")
    pr.set_defaults(func=_cmd_models_remove)


def _organ_list(pkg) -> str:
    return ", ".join(pkg.organ_names)


def _cmd_models_list(args) -> int:
    from ..registry.store import builtin_models_dir, package_origin, scan_packages, user_models_dir

    scan = scan_packages()
    for b in scan.broken:
        print(f"{PROG}: warning: skipping model folder {b.path}: {b.reason}", file=sys.stderr)
    shadowed = {p.name for p in scan.shadowed}
    defaults = _defaults_by_name(scan.packages)
    if getattr(args, "json", False):
        print(json.dumps([
            {"name": p.name, "version": p.version, "method": p.method_name, "modality": p.modality,
             "default_for": defaults.get(p.name), "organs": p.organ_names,
             "origin": package_origin(p), "path": str(p.path), "shadows_builtin": p.name in shadowed}
            for p in scan.packages
        ], indent=2))
        return 0
    if not scan.packages:
        print(f"no models installed (built-in folder: {builtin_models_dir()}; user folder: {user_models_dir()})")
        print(f"install one with '{PROG} models install PACKAGE.zip'")
        return 0
    rows = [("NAME", "VERSION", "METHOD", "MODALITY", "ORGANS", "WHERE")]
    for p in scan.packages:
        where = f"{package_origin(p)}: {p.path}"
        if p.name in shadowed:
            where += " (shadows the built-in)"
        modality = p.modality + (" (default)" if defaults.get(p.name) else "")
        rows.append((p.name, p.version, p.method_name, modality, _organ_list(p), where))
    _print_table(rows)
    for modality in MODALITIES:
        if modality in defaults.values():
            continue
        if any(p.modality == modality for p in scan.packages):
            print(f"no default {modality} model: {DEFAULT_MODELS[modality]!r} is not installed and several {modality} "
                  f"models are; 'segment' needs --model for a{'n' if modality == 'MR' else ''} {modality} input")
        else:
            print(f"no {modality} model installed (install one with '{PROG} models install PACKAGE.zip')")
    return 0


def _defaults_by_name(packages) -> dict[str, str]:
    """Package name -> the modality it is the default model for (what 'segment' uses without --model)."""
    from ..modality import pick_default

    installed = {p.name: p.modality for p in packages}
    found = {}
    for modality in MODALITIES:
        name = pick_default(modality, installed)
        if name is not None:
            found[name] = modality
    return found


#: ``models info`` keeps its lines to this many characters (longer values wrap under their label).
INFO_WIDTH = 100


def _info_line(label: str, text: str) -> str:
    """``label: text`` wrapped at :data:`INFO_WIDTH`, continuation lines indented under the text."""
    import textwrap

    head = f"{label + ':':<10} "
    return textwrap.fill(text, width=INFO_WIDTH, initial_indent=head, subsequent_indent=" " * len(head),
                         break_long_words=False, break_on_hyphens=False)


def _input_text(pre: dict) -> str:
    """The preprocessing in a phrase, e.g. "CT, window [-125, 275] HU, 2 mm in-plane, LPS, 3 context slices"."""
    parts = [str(pre.get("modality", "?"))]
    if pre.get("modality") == "CT" and pre.get("ct_window"):
        lo, hi = pre["ct_window"]
        parts.append(f"window [{lo:g}, {hi:g}] HU")
    if pre.get("modality") == "MR" and pre.get("mr_percentiles"):
        lo, hi = pre["mr_percentiles"]
        parts.append(f"scaled between its {lo:g} and {hi:g} percentiles")
    if pre.get("spacing"):
        parts.append(" × ".join(f"{float(v):g}" for v in pre["spacing"]) + " mm in-plane")
    if pre.get("orientation"):
        parts.append(str(pre["orientation"]))
    if int(pre.get("context_slices", 1) or 1) > 1:
        parts.append(f"{pre['context_slices']} context slices")
    return ", ".join(parts)


def _cmd_models_info(args) -> int:
    from ..registry.card import data_text, score_lines
    from ..registry.store import MODEL_JSON, package_info, package_origin, scan_package_infos

    pkg = package_info(args.name)  # model.json alone: no torch
    if getattr(args, "verify", False):
        pkg.verify()  # raises ModelError naming the mismatch
    if args.json:  # the full record, for machines
        print(json.dumps(json.loads((pkg.path / MODEL_JSON).read_text(encoding="utf-8")), indent=2))
        return 0
    installed = scan_package_infos().packages
    is_default = any(p.name == pkg.name and p.path == pkg.path for p in installed) and \
        _defaults_by_name(installed).get(pkg.name) == pkg.modality
    lines = [f"{pkg.name} {pkg.version} ({package_origin(pkg)})"]
    if pkg.description:
        lines.append(_info_line("about", pkg.description))
    lines.append(_info_line("method", pkg.method_name))
    lines.append(_info_line("modality", pkg.modality + (f" (the default {pkg.modality} model)" if is_default else "")))
    lines.append(_info_line("organs", ", ".join(pkg.organ_names)))
    lines.append(_info_line("input", _input_text(pkg.preprocessing)))
    lines.append(_info_line("data", data_text(pkg.provenance) or "not recorded"))
    scores = score_lines(pkg.metrics)
    for i, text in enumerate(scores or ["none recorded"]):
        lines.append(_info_line("scores" if i == 0 else "", text))
    verified = " (verified)" if getattr(args, "verify", False) else ""
    lines.append(_info_line("weights", f"sha256 {pkg.weights_sha256}{verified}"))
    card = pkg.path / "MODEL_CARD.md"
    lines.append(_info_line("card", str(card) if card.is_file() else f"none (the package is in {pkg.path})"))
    lines.append(f"the full record (provenance, metrics, settings): {PROG} models info {args.name} --json")
    print("\n".join(lines))
    return 0


def _is_catalogue_name(source: str) -> bool:
    """Whether ``models install SOURCE`` names a catalogue package rather than a zip file or a URL."""
    import os
    from pathlib import Path

    from ..registry.store import is_url

    return not (is_url(source) or source.lower().endswith(".zip") or os.sep in source
                or (os.altsep is not None and os.altsep in source) or Path(source).expanduser().exists())


def _cmd_models_install(args) -> int:
    from ..registry.catalogue import install_from_catalogue, load_catalogue
    from ..registry.store import builtin_models_dir, install_package

    by_name = _is_catalogue_name(args.zip)
    if by_name:
        catalogue = load_catalogue()
        if args.zip not in catalogue.names():
            raise ModelError(f"{args.zip!r} is neither a package zip nor a URL, nor a package of the model catalogue "
                             f"(it lists: {', '.join(catalogue.names()) or 'none'}; see '{PROG} models catalogue')")
        if args.sha256:
            raise ModelError("--sha256 is for a zip or a URL: a catalogue package is checked against the "
                             "catalogue's sha256 and size")
    elif args.catalogue_url:
        raise ModelError("--catalogue-url is for a catalogue package (install NAME), not for a zip or a URL")
    progress = _Progress(sys.stderr.isatty())
    try:
        if by_name:
            pkg = install_from_catalogue(args.zip, base_url=args.catalogue_url, force=args.force, progress=progress,
                                         catalogue=catalogue)
        else:
            pkg = install_package(args.zip, sha256=args.sha256, force=args.force, progress=progress)
    finally:
        progress.close()
    print(f"installed {pkg.name} {pkg.version} ({pkg.method_name}; organs: {_organ_list(pkg)}) to {pkg.path}")
    if (builtin_models_dir() / pkg.name).is_dir():
        print("note: it takes precedence over the built-in model of the same name")
    return 0


def _cmd_models_catalogue(args) -> int:
    from ..registry.catalogue import catalogue_base_url, is_placeholder, load_catalogue, set_catalogue_url
    from ..registry.store import scan_package_infos

    if args.set_url and args.unset_url:
        raise ModelError("give --set-url URL or --unset-url, not both")
    if args.set_url or args.unset_url:
        path = set_catalogue_url(None if args.unset_url else args.set_url)
        print(f"catalogue base URL {'removed from' if args.unset_url else 'stored in'} {path}")
    catalogue = load_catalogue()
    base, source = catalogue_base_url(None, catalogue)
    installed = {p.name: p.version for p in scan_package_infos().packages}
    if args.json:
        print(json.dumps({"base_url": base, "base_url_from": source, "packages": [
            {**e.to_dict(), "download_url": e.download_url(base), "installed_version": installed.get(e.name)}
            for e in catalogue.entries]}, indent=2))
        return 0
    rows = [("NAME", "VERSION", "METHOD", "MODALITY", "SIZE", "INSTALLED")]
    for e in sorted(catalogue.entries, key=lambda e: (e.method, e.name)):
        rows.append((e.name, e.version, e.method, e.modality, f"{e.size / 1e6:.1f} MB", installed.get(e.name, "no")))
    _print_table(rows)
    print(f"base URL: {base} (from {source})" + (" - a placeholder: set a server or mirror with --set-url URL or "
                                                 f"${CATALOGUE_URL_ENV}" if is_placeholder(base) else ""))
    print(f"install one with '{PROG} models install NAME'")
    return 0


def _cmd_models_update(args) -> int:
    from ..registry.store import update_package

    progress = _Progress(sys.stderr.isatty())
    try:
        before, after = update_package(args.name, args.source, sha256=args.sha256,
                                       allow_downgrade=args.allow_downgrade, progress=progress)
    finally:
        progress.close()
    print(f"updated {after.name} from {before.version} to {after.version} ({after.path})")
    return 0


def _cmd_models_remove(args) -> int:
    from ..registry.store import builtin_models_dir, remove_package

    path = remove_package(args.name)
    print(f"removed {args.name} ({path})")
    if (builtin_models_dir() / args.name).is_dir():
        print(f"note: the built-in {args.name} is used again")
    return 0


# -- entry point ---------------------------------------------------------------------------------

#: Subcommand builders, in help order. Other commands add themselves here.
SUBCOMMANDS: list[Callable] = [_add_segment, _add_models]

#: Further commands, one module each under MedDiffSegLib/cli/, in the order they appear in
#: --help. Each module defines ``add_parser(sub)`` which adds its subparser and sets ``func``
#: (a callable taking the parsed args and returning an exit code).
COMMAND_MODULES: tuple[str, ...] = ("refine", "batch", "train", "pretrain", "evaluate", "export_dicom_seg", "send")


def _command_module_adders() -> list[Callable]:
    import importlib
    import importlib.util

    adders = []
    for name in COMMAND_MODULES:
        full = f"{__package__}.{name}"
        if importlib.util.find_spec(full) is not None:  # modules land issue by issue
            adders.append(importlib.import_module(full).add_parser)
    return adders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MedDiffSeg: diffusion-model segmentation of CT and MRI with ensemble uncertainty.",
        epilog=EXIT_CODES_TEXT + f"\nRun '{PROG} COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS + _command_module_adders():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: keep argparse's code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    _setup_logging()
    try:
        return int(args.func(args) or 0)
    except MedDiffSegError as exc:
        _err(str(exc) or type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return Cancelled.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
