#!/usr/bin/env python
"""How far the uncertainty can be trusted, per sampling setting, on the protocol's test patients.

    python bench/evaluate_uncertainty.py MODEL [--settings 1x1 1x5 1x10 4x5] [--seed 0]
        [--cases A B ...] [--out DIR] [--doc docs/uncertainty.md] [--band-mm 10]

A setting ``SxN`` is S denoising steps and N samples per organ. For every test case of
``bench/protocol.json`` of the package's modality, each setting segments the case once (all the
dataset's organs prompted together, as a user would) and scores, per organ (definitions in
:mod:`MedDiffSegLib.evaluation.uncertainty`):

- **variance** (the overlay map: the samples' variance of the assigned organ, background: the
  largest over organs) and **entropy** (binary entropy, bits, of the organ's mean probability) as
  error detectors: AUROC for the organ's voxel errors inside the band of voxels within
  ``--band-mm`` of the predicted or the true organ;
- ECE of the organ's mean probability inside that band;
- the fraction of missed voxels (false negatives) flagged at the default thresholds
  (variance >= 0.01, i.e. a standard deviation of 0.1 between samples; entropy >= 0.5 bit, i.e.
  a mean probability between 0.11 and 0.89);
- per organ and case, the mean of each map inside the predicted organ, for the case-level
  Spearman correlation with 1 - Dice (pooled over organs and cases; missed organs, whose
  prediction is empty, use the mean over the band);
- the missed-structure signal: organ ends where the truth continues for slices beyond the
  prediction (a slice counts when the true organ covers >= 1 cm² of it) and whether the
  summary's ``possible_continuation`` names one of those slices; runs it names where the true
  organ is absent count as false alarms.

Writes ``DIR/summary.json`` (after every case, so a run cut short keeps the cases it finished) and,
with ``--doc``, a table into that Markdown file (between markers for this model and ``--label``).
Threads: set ``OMP_NUM_THREADS`` as for any run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

VARIANCE_FLAG = 0.01
ENTROPY_FLAG = 0.5
MISSED_AREA_MM2 = 100.0
SMOOTH_MM = 1.5


def _setting(text: str) -> tuple[int, int]:
    try:
        steps, samples = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is STEPSxSAMPLES such as 1x10, got {text!r}") from None
    if steps < 1 or samples < 1:
        raise argparse.ArgumentTypeError(f"steps and samples must be >= 1, got {text!r}")
    return steps, samples


def _crop(band_mm: float, spacing_zyx, *masks) -> tuple[slice, ...] | None:
    union = np.logical_or.reduce(masks)
    if not union.any():
        return None
    idx = np.nonzero(union)
    pad = [int(math.ceil(band_mm / s)) + 1 for s in spacing_zyx]
    return tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + p + 1))
                 for i, p, n in zip(idx, pad, union.shape))


def _ends(pred: np.ndarray, gt: np.ndarray, axis: int, area_vox: float, runs: list[dict]) -> dict:
    """Missed organ ends along ``axis`` (input slice indices) and which the continuation runs name."""
    other = tuple(a for a in range(3) if a != axis)
    gt_area = gt.sum(axis=other) * area_vox
    pred_n = pred.sum(axis=other)
    present = np.flatnonzero(pred_n > 0)
    beyond = [r for r in runs if r["kind"] in ("beyond_mask", "not_segmented")]
    out = {"missed_ends": 0, "detected": 0, "runs": len(beyond), "false_alarms": 0}
    truth_slices = set(np.flatnonzero(gt_area > 0).tolist())
    for r in beyond:
        if not truth_slices & set(r["slices"]):
            out["false_alarms"] += 1
    if present.size == 0:
        missed = [set(np.flatnonzero(gt_area >= MISSED_AREA_MM2).tolist())]
    else:
        lo, hi = int(present[0]), int(present[-1])
        missed = [set(k for k in np.flatnonzero(gt_area >= MISSED_AREA_MM2).tolist() if k < lo),
                  set(k for k in np.flatnonzero(gt_area >= MISSED_AREA_MM2).tolist() if k > hi)]
    for m in missed:
        if not m:
            continue
        out["missed_ends"] += 1
        if any(m & set(r["slices"]) for r in beyond):
            out["detected"] += 1
    return out


def _mean_sd(values):
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(m, s, n, nd=3):
    return "-" if m is None else f"{m:.{nd}f} ± {s:.{nd}f} (n={n})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--protocol", type=Path, default=REPO / "bench" / "protocol.json")
    ap.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                    help="draw every sample in every window (the engine's adaptive sampling off)")
    ap.add_argument("--body-crop", dest="crop_body", action=argparse.BooleanOptionalAction, default=None,
                    help="windows cut to the body's in-plane box, or not (default: the package's inference.body_crop)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="network arithmetic (the engine's precision; default auto)")
    ap.add_argument("--settings", type=_setting, nargs="+", default=[(1, 1), (1, 5), (1, 10), (4, 5)])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="+")
    ap.add_argument("--band-mm", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--doc", type=Path)
    ap.add_argument("--label", default="uncertainty", help="names this table in --doc (e.g. calibrated)")
    ap.add_argument("--from-summary", type=Path, metavar="SUMMARY_JSON",
                    help="run nothing: print (and --doc) the table of an earlier run's summary.json")
    args = ap.parse_args(argv)
    if args.from_summary:
        from evaluate_protocol import _write_doc

        summary = json.loads(args.from_summary.read_text(encoding="utf-8"))
        text = _table(summary, args.label)
        print(text)
        if args.doc:
            _write_doc(args.doc, summary["model"], args.label, text)
        return 0

    import SimpleITK as sitk
    import torch

    from evaluate_protocol import _data_root, _write_doc
    from MedDiffSegLib.evaluation.evaluate import on_reference_grid, to_json_ready
    from MedDiffSegLib.evaluation.protocol import protocol_cases
    from MedDiffSegLib.evaluation.uncertainty import organ_uncertainty
    from MedDiffSegLib.inference import segment_volume
    from MedDiffSegLib.inference.device import device_description
    from MedDiffSegLib.io import read_volume
    from MedDiffSegLib.registry import resolve_model
    from MedDiffSegLib.registry.package import _write_json_atomic

    protocol = json.loads(args.protocol.read_text(encoding="utf-8"))
    pkg = resolve_model(args.model)
    method = pkg.load_method("cpu")
    cases = [c for c in protocol_cases(protocol, pkg.preprocessing.modality, pkg.organ_names, _data_root(), args.cases)
             if c["role"] == "test"]
    if not cases:
        print(f"no protocol test case fits {pkg.name}", file=sys.stderr)
        return 2
    out_dir = args.out or REPO / "bench" / "results" / f"uncertainty-{pkg.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": pkg.name, "version": pkg.version, "weights_sha256": pkg.weights_sha256, "seed": args.seed,
            "calibration": (pkg.inference.get("calibration") or {}).get("temperature"),
            "band_mm": args.band_mm, "variance_flag": VARIANCE_FLAG, "entropy_flag": ENTROPY_FLAG,
            "hardware": f"{device_description(torch.device('cpu'))}, {torch.get_num_threads()} thread(s), "
                        f"{platform.machine()}",
            "command": "python bench/evaluate_uncertainty.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows: list[dict] = []
    for n_done, c in enumerate(cases, start=1):
        image = read_volume(c["image"])
        truth, _ = on_reference_grid(sitk.ReadImage(str(c["label"])), image, "the ground truth", "the image")
        g_all = sitk.GetArrayFromImage(truth)
        spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
        for steps, samples in args.settings:
            t0 = time.perf_counter()
            res = segment_volume(image, pkg, c["organs"], samples=samples, steps=steps, seed=args.seed, method=method,
                                 keep_probabilities=True, adaptive=args.adaptive, crop_body=args.crop_body, precision=args.precision)
            seconds = time.perf_counter() - t0
            labels = sitk.GetArrayViewFromImage(res.labels)
            unc = sitk.GetArrayViewFromImage(res.uncertainty)
            for i, (organ, st) in enumerate(zip(c["organs"], res.stats), start=1):
                pred = labels == i
                gt = g_all == int(c["table"][organ])
                box = _crop(args.band_mm, spacing_zyx, pred, gt)
                inter = float(np.logical_and(pred, gt).sum())
                denom = float(pred.sum() + gt.sum())
                dice = 1.0 if denom == 0 else 2 * inter / denom
                row = {"case": c["name"], "organ": organ, "steps": steps, "samples": samples, "seconds": seconds,
                       "dice": dice, "gt_voxels": int(gt.sum()), "pred_voxels": int(pred.sum()),
                       # samples the engine drew per window for this organ (adaptive sampling draws fewer)
                       "samples_per_window": ((res.extras.get("sampling") or {}).get("organs", {}).get(organ) or {})
                       .get("samples_per_window")}
                if box is not None:
                    prob = sitk.GetArrayFromImage(res.probabilities[organ])[box]  # a copy: the image is built on access
                    ent = sitk.GetArrayFromImage(res.entropy[organ])[box]
                    kw = dict(spacing_zyx=spacing_zyx, band_mm=args.band_mm)
                    pb, gb = pred[box], gt[box]
                    v = organ_uncertainty(pb, gb, unc[box], prob, flag_threshold=VARIANCE_FLAG, **kw)
                    e = organ_uncertainty(pb, gb, ent, None, flag_threshold=ENTROPY_FLAG, **kw)
                    # Entropy smoothed with a 1.5 mm Gaussian: errors form bands a few voxels thick around
                    # the boundary, the entropy peaks on its centre line.
                    es = ndimage.gaussian_filter(ent, [SMOOTH_MM / s for s in spacing_zyx])
                    e_s = organ_uncertainty(pb, gb, es, None, **kw)
                    # Model-free reference: closeness to the predicted boundary (errors of any segmenter
                    # concentrate there); an uncertainty map is only informative where it beats this.
                    sd = np.abs(ndimage.distance_transform_edt(~pb, sampling=spacing_zyx)
                                - ndimage.distance_transform_edt(pb, sampling=spacing_zyx)) if pb.any() else None
                    d = organ_uncertainty(pb, gb, -sd, None, **kw) if sd is not None else {"auroc_near": None}
                    row.update({
                        "entropy_smoothed_auroc_near": e_s["auroc_near"], "boundary_distance_auroc_near": d["auroc_near"],
                        "variance_auroc_near": v["auroc_near"], "entropy_auroc_near": e["auroc_near"],
                        "ece_near": v["ece_near"], "variance_fn_flagged": v["fn_flagged"],
                        "entropy_fn_flagged": e["fn_flagged"],
                        "variance_mean": v["mean_score_in_prediction"] if pred.any() else v["mean_score_near"],
                        "entropy_mean": e["mean_score_in_prediction"] if pred.any() else e["mean_score_near"],
                    })
                axis = st.slice_axis if st.slice_axis is not None else 0
                area_vox = float(np.prod([s for a, s in enumerate(spacing_zyx) if a != axis]))
                row["ends"] = _ends(pred, gt, axis, area_vox, st.possible_continuation)
                rows.append(row)
            print(f"[{c['name']} {steps}x{samples}] {seconds:.1f} s; " + ", ".join(
                f"{r['organ']} D{r['dice']:.2f} Av{_n(r.get('variance_auroc_near'))} Ae{_n(r.get('entropy_auroc_near'))}"
                for r in rows if r["case"] == c["name"] and r["steps"] == steps and r["samples"] == samples),
                file=sys.stderr)
            del res
        # Written after every case: a run cut short keeps the cases it finished (``cases`` says which).
        summary = to_json_ready(_summarise(meta, [d["name"] for d in cases[:n_done]], args.settings, rows))
        _write_json_atomic(out_dir / "summary.json", summary)
    text = _table(summary, args.label)
    print(text)
    if args.doc:
        _write_doc(args.doc, pkg.name, args.label, text)
    return 0


def _summarise(meta: dict, case_names: list[str], settings, rows: list[dict]) -> dict:
    """The run's summary: per setting, the aggregates over the organ-cases of ``rows``."""
    from MedDiffSegLib.evaluation.uncertainty import spearman

    summary = dict(meta, cases=list(case_names), settings={}, rows=rows)
    for steps, samples in settings:
        sel = [r for r in rows if r["steps"] == steps and r["samples"] == samples]
        if not sel:
            continue
        agg = {"seconds_median": float(np.median([r["seconds"] for r in sel]))}
        for key in ("dice", "variance_auroc_near", "entropy_auroc_near", "entropy_smoothed_auroc_near",
                    "boundary_distance_auroc_near", "ece_near", "variance_fn_flagged", "entropy_fn_flagged"):
            agg[key] = _mean_sd(r.get(key) for r in sel if r["gt_voxels"] > 0)
        for score in ("variance", "entropy"):
            pairs = [(r[f"{score}_mean"], 1 - r["dice"]) for r in sel
                     if r.get(f"{score}_mean") is not None and r["gt_voxels"] > 0]
            agg[f"{score}_spearman"] = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
            agg[f"{score}_spearman_n"] = len(pairs)
        ends = [r["ends"] for r in sel]
        agg["ends"] = {k: int(sum(e[k] for e in ends)) for k in ("missed_ends", "detected", "runs", "false_alarms")}
        summary["settings"][f"{steps}x{samples}"] = agg
    return summary


def _n(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(summary: dict, label: str = "") -> str:
    lines = [f"### {summary['model']} {summary['version']}" + (f" — {label}" if label else ""), "",
             f"`{summary['command']}` (seed {summary['seed']}; {summary['hardware']}); "
             f"{len(summary['cases'])} test patients: {', '.join(summary['cases'])}. Per organ and case, mean ± sd "
             f"over organ-cases with the organ in the truth (n); band: ≤ {summary['band_mm']:g} mm from the predicted "
             "or true organ. ρ: Spearman over organ-cases of the map's mean inside the prediction vs 1 − Dice.",
             "",
             "| steps × samples | s/case | Dice | AUROC near (variance) | AUROC near (entropy) | (entropy, 1.5 mm "
             "smoothed) | (boundary distance, no model) | ECE near | "
             "missed voxels flagged (var ≥ 0.01) | (entropy ≥ 0.5) | ρ variance | ρ entropy | missed ends found |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in summary["settings"].items():
        e = a["ends"]
        lines.append(
            f"| {name.replace('x', ' × ')} | {a['seconds_median']:.1f} | {_fmt(*a['dice'])} | "
            f"{_fmt(*a['variance_auroc_near'])} | {_fmt(*a['entropy_auroc_near'])} | "
            f"{_fmt(*a['entropy_smoothed_auroc_near'])} | {_fmt(*a['boundary_distance_auroc_near'])} | {_fmt(*a['ece_near'])} | "
            f"{_fmt(*a['variance_fn_flagged'])} | {_fmt(*a['entropy_fn_flagged'])} | "
            f"{_n(a['variance_spearman'])} (n={a['variance_spearman_n']}) | {_n(a['entropy_spearman'])} | "
            f"{e['detected']}/{e['missed_ends']} ({e['false_alarms']} of {e['runs']} runs false) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
