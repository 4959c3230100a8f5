#!/usr/bin/env python
"""Turn the output of ``bench/evaluate_model.sh`` into model-card tables and package metrics.

    python bench/record_evaluation.py EVAL_DIR [--package DIR --command "bash bench/evaluate_model.sh ..."]

Reads ``EVAL_DIR/<case>/scores.json`` (written by ``meddiffseg evaluate --json``) and
``EVAL_DIR/<case>.time.json`` (wall seconds and peak RSS of ``meddiffseg segment``) for the cases
the script runs, and prints Markdown tables (one per case: Dice, HD95, ASSD, status per organ,
the uncertainty AUROC and the segmentation time). With ``--package`` it also records the same
numbers under ``"metrics"`` in that package's ``model.json`` (written to a temporary file, then
renamed; the weights and their sha256 are not touched), so ``meddiffseg models list`` and the
Slicer module can show them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

#: The cases of bench/evaluate_model.sh, in its order, with what each one measures.
CASES = {
    "dcmqi-ct-3slice": "UNSEEN patient, other source (dcmqi test CT, 3 slices, liver labelled)",
    "ts-ct": "training patient (TotalSegmentator example CT, 3 mm)",
    "ts-ct-dicom": "training patient (TotalSegmentator DICOM CT, 0.98x0.98x2 mm)",
}


def _num(v, nd: int) -> str:
    if v is None:
        return "—"
    if isinstance(v, str) or (isinstance(v, float) and math.isinf(v)):
        return "inf"
    return f"{v:.{nd}f}"


def _rounded(v, nd: int):
    return v if v is None or isinstance(v, str) or math.isinf(v) else round(float(v), nd)


def load_case(eval_dir: Path, case: str, samples: int) -> dict | None:
    scores = eval_dir / case / "scores.json"
    if not scores.is_file():
        return None
    report = json.loads(scores.read_text(encoding="utf-8"))
    out: dict = {"role": CASES[case], "organs": {}}
    for o in report["organs"]:
        out["organs"][o["name"]] = {"dice": _rounded(o["dice"], 4), "hd95_mm": _rounded(o["hd95_mm"], 2),
                                    "assd_mm": _rounded(o["assd_mm"], 2), "status": o["status"]}
    u = report.get("uncertainty")
    if u and samples > 1:  # one sample cannot disagree with itself: its variance is 0 everywhere
        out["uncertainty_auroc"] = _rounded(u["auroc"], 4)
        out["uncertainty_auroc_foreground"] = _rounded(u["auroc_foreground"], 4)
    timing = eval_dir / f"{case}.time.json"
    if timing.is_file():
        t = json.loads(timing.read_text(encoding="utf-8"))
        out["segment_wall_s"] = float(t["wall_s"])
        out["segment_peak_rss_mb"] = round(int(t["peak_rss_kb"]) / 1024.0)
    out["size"] = report.get("size")
    out["spacing_mm"] = [round(s, 3) for s in report.get("spacing_mm", [])]
    return out


def markdown(case: str, r: dict) -> str:
    lines = [f"### {case}: {r['role']}", "", "| organ | Dice | HD95 (mm) | ASSD (mm) | status |",
             "| --- | --- | --- | --- | --- |"]
    for name, o in r["organs"].items():
        lines.append(f"| {name} | {_num(o['dice'], 3)} | {_num(o['hd95_mm'], 2)} | {_num(o['assd_mm'], 2)} | {o['status']} |")
    lines.append("")
    extra = []
    if "uncertainty_auroc" in r:
        extra.append(f"Uncertainty AUROC {_num(r['uncertainty_auroc'], 3)} "
                     f"(foreground {_num(r['uncertainty_auroc_foreground'], 3)}).")
    else:
        extra.append("No uncertainty score: one sample, so the variance is zero everywhere.")
    if "segment_wall_s" in r:
        size = "×".join(str(s) for s in r.get("size") or [])
        extra.append(f"`meddiffseg segment` of the {len(r['organs'])} organ(s) above on this {size} volume: "
                     f"{r['segment_wall_s']:.1f} s wall, peak RSS {r['segment_peak_rss_mb']} MB.")
    if extra:
        lines += [" ".join(extra), ""]
    return "\n".join(lines)


def write_metrics(package: Path, evaluation: dict, command: str | None, samples: int) -> None:
    path = package / "model.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    inference = data.get("inference", {})
    metrics = data.get("metrics") or {}
    metrics["evaluation"] = evaluation
    metrics["settings"] = {"samples": samples, "steps": inference.get("steps"),
                           "scheduler": inference.get("scheduler"), "seed": 0, "device": "cpu"}
    if command:
        metrics["command"] = command
    data["metrics"] = metrics
    fd, tmp = tempfile.mkstemp(prefix=".model.json.", dir=package)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path, help="the OUTDIR given to bench/evaluate_model.sh")
    ap.add_argument("--package", type=Path, help="record the numbers in this package folder's model.json")
    ap.add_argument("--command", help="the evaluate_model.sh call that produced EVAL_DIR (recorded with the numbers)")
    ap.add_argument("--samples", type=int, help="the SAMPLES given to evaluate_model.sh (default: the package's)")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the cases found in EVAL_DIR (an ONLY=... run), keep the package's other cases")
    args = ap.parse_args(argv)
    samples = args.samples
    if samples is None and args.package:
        samples = int(json.loads((args.package / "model.json").read_text(encoding="utf-8"))
                      .get("inference", {}).get("samples", 1))
    if samples is None:
        ap.error("give --samples (the SAMPLES of evaluate_model.sh) or --package")
    evaluation = {}
    for case in CASES:
        r = load_case(args.eval_dir, case, samples)
        if r is not None:
            evaluation[case] = r
            print(markdown(case, r))
    if not evaluation:
        print(f"record_evaluation: no <case>/scores.json under {args.eval_dir}", file=sys.stderr)
        return 2
    if args.package:
        if args.merge:
            recorded = json.loads((args.package / "model.json").read_text(encoding="utf-8")).get("metrics") or {}
            evaluation = {**(recorded.get("evaluation") or {}), **evaluation}
        write_metrics(args.package, evaluation, args.command, samples)
        print(f"recorded {len(evaluation)} case(s) in {args.package / 'model.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
