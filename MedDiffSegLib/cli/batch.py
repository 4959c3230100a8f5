"""``meddiffseg batch``: segment a cohort of studies, resumable, on Ray workers (or in-process)."""

from __future__ import annotations

import argparse
import sys

from .main import PROG, _CancelOnInterrupt, add_run_options

# Same as MedDiffSegLib.cohort.segmenter.DEFAULT_MAX_VOXELS (not imported here: --help stays fast;
# a test checks they agree).
DEFAULT_MAX_VOXELS = 2**30
DEFAULT_RETRIES = 2

DESCRIPTION = """\
Segment every study of a cohort with the same model and options, and write one
table of the results. Each study gets exactly the outputs of 'meddiffseg segment'
in DIR/<id>/; DIR/batch.csv has one row per study.

INPUTS is one of
  - a folder of volume files (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd): the id of
    a study is its file name without the extension;
  - a folder of DICOM series, one series per subfolder: the id is the subfolder's name
    (volume files and series subfolders may also be mixed in one folder);
  - a CSV file of id,path[,modality] (a header row 'id,path,modality' is optional;
    relative paths are relative to the CSV's folder; modality CT or MR, or empty).
Ids become folder names: characters other than letters, digits, '.', '_' and '-'
become '_'; two studies that would share a folder are refused before anything runs.
The inputs are only read, never modified.
"""

EPILOG = f"""\
engine:
  With Ray installed (pip install 'meddiffseg[cluster]'), studies run on Ray workers:
  without --address a local Ray instance runs --workers workers on this machine (default:
  one per CPU, or per GPU with --gpus-per-worker); with --address the batch joins that
  cluster (its nodes need MedDiffSeg installed, and INPUTS and DIR reachable at the same
  paths). Each worker is a process that loads the model once (checking its sha256) and
  segments study after study. Without Ray the studies run one after another in this
  process, and the command says so.

nothing lost, nothing done twice:
  A study's outputs are written in a hidden folder in DIR and renamed to DIR/<id> when
  complete. A study whose DIR/<id>/summary.json records the same model (sha256) and the
  same settings, with all its outputs present, is skipped: rerun the same command after a
  crash, a cancel or new studies, and only the missing or failed ones run. A study with
  other settings is redone (DIR/<id> is replaced, only if it holds nothing but MedDiffSeg
  outputs). A bad study (unreadable, not 3D, wrong modality, more voxels than
  --max-voxels, ...) is recorded with its error and the batch goes on. A worker that dies
  during a study (killed, out of memory, node lost) is replaced and the study given to a
  fresh worker, at most --retries more times. Ctrl-C stops the running studies (nothing
  half-written is kept) and leaves the finished ones and a valid table; a second Ctrl-C
  stops at once.

batch.csv (rewritten atomically as studies finish):
  id, path, status (ok, skipped, error, cancelled, pending), error, seconds, worker,
  attempts, model, modality, then per --organ: <organ>_volume_ml,
  <organ>_mean_uncertainty, <organ>_review (where it probably continues unsegmented),
  <organ>_review_slice (the slice to look at first), and modality_overridden.

exit codes:
  0    every study is done (segmented now or before)
  1    some studies failed (their errors are in batch.csv), or an invalid option
  2    INPUTS is missing or is not a folder of studies or a valid CSV
  3    model problem (not installed, corrupt, unknown organ): nothing runs
  4    device problem (e.g. --device cuda without a GPU, no room on the cluster)
  5    DIR cannot be created or written, or another batch is writing to it
  130  cancelled (Ctrl-C): finished studies are kept; rerun to continue

examples:
  {PROG} batch cohort/ --modality CT --organ liver --out results/
  {PROG} batch studies.csv --organ liver --organ spleen --samples 5 --out results/ --workers 4
  {PROG} batch dicom_series/ --organ liver --out results/ --address auto --gpus-per-worker 1
"""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="segment a cohort of studies (Ray workers; resumable; one table)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", metavar="INPUTS",
                   help="folder of volumes, folder of DICOM series (one per subfolder), or CSV of id,path[,modality]")
    p.add_argument("--organ", action="append", required=True, metavar="ORGAN",
                   help="organ to segment in every study (repeat for several; label i = the i-th --organ), "
                        "or 'all' for every organ of the model")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: DIR/<id>/ per study and DIR/batch.csv (created if missing)")
    add_run_options(p, modality_help="what the studies are, CT or MR, when the CSV does not say; a DICOM "
                                     "series' Modality tag must agree. Needed without --model for volume files",
                    dicom_seg_needs="only for studies that are DICOM series folders (the others fail)")
    g = p.add_argument_group("batch")
    g.add_argument("--address", metavar="ADDR",
                   help="join this Ray cluster (e.g. auto, or ray://head:10001) instead of starting a local instance")
    g.add_argument("--workers", type=int, metavar="N",
                   help="Ray workers (default: as many as the CPUs, or the GPUs with --gpus-per-worker, allow)")
    g.add_argument("--cpus-per-worker", type=_positive_float, default=1.0, metavar="F",
                   help="CPUs each worker reserves; also its torch threads (default: 1)")
    g.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0, metavar="F",
                   help="GPUs each worker reserves (0.5: two workers share a GPU; default: 0)")
    g.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                   help=f"times a study whose worker died is given to a fresh worker (default: {DEFAULT_RETRIES})")
    g.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, metavar="N",
                   help=f"refuse studies with more voxels (read from the header; default: {DEFAULT_MAX_VOXELS:,})")
    g.add_argument("--no-ray", dest="use_ray", action="store_false", default=None,
                   help="run the studies one after another in this process even when Ray is installed")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no per-study lines (errors still shown)")
    p.set_defaults(func=run)


class _Display:
    """A tqdm bar over the studies (on a terminal) or one line per finished study, and the notes."""

    def __init__(self, bar: bool, quiet: bool):
        self.want_bar, self.quiet = bar, quiet
        self.bar = None
        self.done = 0
        self.total = 0
        self.counts = {"ok": 0, "error": 0}

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def note(self, text: str) -> None:
        self._print(f"{PROG}: note: {text}")

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "plan":
            self.total = data["to_run"]
            if not self.quiet:
                engine = {"ray": f"on {data['workers']} Ray worker(s)", "in-process": "in this process",
                          "none": ""}[data["engine"]]
                print(f"{data['studies']} studies: {data['skipped']} already done, {data['to_run']} to segment"
                      + (f" {engine}" if engine else ""), file=sys.stderr)
            if self.want_bar and self.total and not self.quiet:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="study", file=sys.stderr, dynamic_ncols=True,
                                desc="studies", bar_format="{desc} {n_fmt}/{total_fmt}|{bar}| {elapsed}<{remaining}"
                                                           " {rate_fmt}{postfix}")
        elif kind == "finished":
            r, outcome = data["row"], data["outcome"]
            self.done += 1
            status = r["status"]
            self.counts[status] = self.counts.get(status, 0) + 1
            for w in outcome.get("warnings") or []:
                self._print(f"{PROG}: warning: {r['id']}: {w}")
            if outcome.get("traceback"):
                self._print(f"{PROG}: {r['id']}: unexpected error (a bug, please report it):\n{outcome['traceback']}")
            where = f"{PROG}:" if self.bar is not None else f"[{self.done}/{self.total}]"
            if status == "error" and not outcome.get("fatal"):  # a fatal error ends the command with it
                self._print(f"{where} {r['id']}: error: {r['error']}")
            elif self.bar is None and not self.quiet:
                seconds = f" ({r['seconds']} s" + (f", {r['worker']})" if r["worker"] else ")") if r["seconds"] else ""
                self._print(f"{where} {r['id']}: {status}{seconds}")
            if self.bar is not None:
                self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.counts.items() if v), refresh=False)
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    from ..cohort.batch import run_batch
    from ..cohort.segmenter import BatchSettings
    from ..errors import MedDiffSegError

    for name, value, minimum in (("--samples", args.samples, 1), ("--steps", args.steps, 1), ("--seed", args.seed, 0),
                                 ("--workers", args.workers, 1), ("--retries", args.retries, 0),
                                 ("--max-voxels", args.max_voxels, 1)):
        if value is not None and value < minimum:
            raise MedDiffSegError(f"{name} must be at least {minimum}, got {value}")
    if args.staple and args.samples is not None and args.samples < 2:
        raise MedDiffSegError(f"--staple fuses several samples and needs --samples 2 or more (got {args.samples})")
    settings = BatchSettings(
        organs=tuple(args.organ), model=args.model, modality=args.modality, samples=args.samples, steps=args.steps,
        seed=args.seed, device=args.device, scheduler=args.scheduler, staple=args.staple,
        largest_component=args.largest_component, save_probabilities=args.save_probabilities,
        dicom_seg=args.dicom_seg, allow_modality_mismatch=args.allow_modality_mismatch, adaptive=args.adaptive,
        crop_body=args.crop_body, precision=args.precision, max_voxels=args.max_voxels,
    )
    display = _Display(bar=sys.stderr.isatty(), quiet=args.quiet)
    try:
        with _CancelOnInterrupt() as cancel:
            report = run_batch(
                args.inputs, args.out, settings, address=args.address, workers=args.workers,
                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, retries=args.retries,
                use_ray=args.use_ray, should_cancel=cancel, on_event=display, notify=display.note,
            )
    finally:
        display.close()
    counts = report.counts
    text = ", ".join(f"{counts[s]} {s}" for s in ("ok", "skipped", "error", "cancelled", "pending") if counts[s])
    rate = ""
    if counts["ok"] and report.seconds > 0:
        rate = f"; {counts['ok'] / report.seconds * 3600:.0f} studies/hour"
    print(f"{len(report.rows)} studies: {text} in {report.seconds:.1f} s{rate}; table: {report.table}")
    if report.cancelled:
        print(f"{PROG}: cancelled; the finished studies are kept: run the same command again to continue",
              file=sys.stderr)
        return 130
    if counts["error"]:
        print(f"{PROG}: error: {counts['error']} of {len(report.rows)} studies failed (see {report.table})",
              file=sys.stderr)
        return 1
    return 0
