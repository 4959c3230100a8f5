#!/usr/bin/env python
"""Interactive correction under the CVPR 2025 interactive-segmentation protocol, on the test patients.

    python bench/evaluate_interactive.py MODEL [--clicks 5] [--variants auto box suggested model-free]
        [--samples 1] [--cases A B ...] [--organs ...] [--out DIR] [--doc docs/interactive.md] [--label L]
        [--polarity user|model] [--suggest-variant NAME='{"reach_mm": 20}' ...] [--held-out]

For every **test** case of ``bench/protocol.json`` of the model's modality (BTCV 6, CHAOS MR 5; used
for nothing else), or with ``--held-out`` every patient the model's training held out (its config's
validation patients: where suggestion settings are chosen), and every organ of the model the
dataset labels, each variant starts from a
result and adds ``--clicks`` clicks, one at a time, each re-sampled by the model
(:class:`~MedDiffSegLib.interactive.session.InteractiveSession`); Dice (input grid) after every
step:

- ``auto``: the automatic segmentation of all organs prompted together (1 sample unless
  ``--samples``), then clicks from the **oracle**: the point deepest inside the largest 3D error
  region of the organ (distance-transform maximum, in mm; positive where the organ is missed,
  negative where it is over-segmented), as the challenge places them;
- ``box``: the organ removed from the automatic result, then a box (the true organ's 3D bounding
  box) as the first step, then oracle clicks;
- ``suggested``: the automatic result, then clicks placed at the model's own first suggestion
  (:func:`~MedDiffSegLib.interactive.session.suggest_clicks`, from the uncertainty; needs
  ``--samples`` >= 2; ``{"use_probability": true}`` ranks by the organ's calibrated mean
  probability instead, kept up to date by the session), or the model-free one when none stands out;
- ``model-free``: the same with the model-free suggestion (the boundary band's largest region);
- ``suggested-NAME`` (``--suggest-variant NAME=JSON``): ``suggested`` with other options of
  ``suggest_clicks`` (several settings compared on one automatic result).

A suggestion says where to look; whether the click there is positive or negative is decided, with
``--polarity user`` (the default), as a radiologist would: by what is there (the ground truth at
the point: organ, a positive click; not organ, a negative one), which may confirm a correct
label. ``--polarity model`` takes the model's guess instead (positive outside the current mask,
negative inside), as the first measurement did.

Reports per variant and organ: Dice at each step (mean ± sd over cases, n), the area under the
Dice-per-step curve (trapezoid, normalised to [0, 1]), the final Dice and the seconds per step;
writes ``DIR/<variant>/<case>.json`` and ``DIR/summary.json`` and, with ``--doc``, the tables into
that Markdown file between markers. Failures (organ absent after the last step) are counted apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from evaluate_protocol import write_doc_block  # noqa: E402  (the doc's marked blocks, as the other reports)

VARIANTS = ("auto", "box", "suggested", "model-free")


def oracle_click(pred: np.ndarray, gt: np.ndarray, spacing_zyx) -> tuple[tuple[int, int, int], bool] | None:
    """The challenge's next click: ``((z, y, x), positive)`` deepest inside the largest 3D error region, or None."""
    from MedDiffSegLib.interactive.prompts import deepest_error

    return deepest_error(pred, gt, spacing_zyx)  # type: ignore[return-value]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def auc(values: list[float]) -> float:
    """Area under Dice per step (trapezoid), steps scaled to [0, 1]."""
    if len(values) < 2:
        return float(values[0]) if values else float("nan")
    return float(np.trapezoid(values, dx=1.0 / (len(values) - 1)))


def gt_box_mm(image, gt: np.ndarray) -> tuple[float, ...]:
    z, y, x = np.nonzero(gt)
    a = image.TransformIndexToPhysicalPoint((int(x.min()), int(y.min()), int(z.min())))
    b = image.TransformIndexToPhysicalPoint((int(x.max()), int(y.max()), int(z.max())))
    return (*a, *b)


def run_case(case: dict, package, method, organs: list[str], variants: list[str], clicks: int, samples: int,
             device: str, log=print, *, polarity: str = "user", suggest_options: dict[str, dict] | None = None) -> dict:
    """Every variant for every organ of one case; returns ``{variant: {organ: record}}``."""
    import SimpleITK as sitk

    from MedDiffSegLib.inference.engine import segment_volume
    from MedDiffSegLib.interactive.session import InteractiveSession, suggest_clicks
    from MedDiffSegLib.io import read_volume
    from MedDiffSegLib.training.data import _labels_on_image_grid

    image = read_volume(case["image"])
    gt_all = sitk.GetArrayFromImage(_labels_on_image_grid(sitk.ReadImage(str(case["label"])), image))
    spacing = tuple(float(v) for v in image.GetSpacing()[::-1])
    t0 = time.perf_counter()
    want_probability = any(o.get("use_probability") for o in (suggest_options or {}).values())
    auto = segment_volume(image, package, organs, samples=samples, seed=0, device=device, method=method,
                          keep_probabilities=want_probability)
    t_auto = time.perf_counter() - t0
    session = InteractiveSession(image, package, organs, auto.labels, auto.uncertainty, method=method, device=device,
                                 samples=samples, probabilities=auto.probabilities)
    session.encode_all()
    start_lab = session.labels_c.copy()
    start_u = session.unc_c.copy()
    start_p = {label: q.copy() for label, q in session.prob_c.items()}
    out: dict = {v: {} for v in variants}
    for organ in organs:
        label = organs.index(organ) + 1
        gt = gt_all == case["table"][organ]
        for variant in variants:
            session.labels_c[...] = start_lab
            session.unc_c[...] = start_u
            for lab_, q in start_p.items():
                session.prob_c[lab_][...] = q
            session.interactions.clear()
            if variant == "box":
                session.labels_c[session.labels_c == label] = 0
            lab = sitk.GetArrayViewFromImage(session.labels)
            steps = [dice(lab == label, gt)]
            seconds: list[float] = []
            kinds: list[str] = []
            if variant == "box" and gt.any():
                t = time.perf_counter()
                session.refine(organ, box=gt_box_mm(image, gt))
                seconds.append(time.perf_counter() - t)
                kinds.append("box")
                steps.append(dice(sitk.GetArrayViewFromImage(session.labels) == label, gt))
            for _ in range(clicks):
                cur = sitk.GetArrayFromImage(session.labels) == label
                if variant in ("auto", "box"):
                    found = oracle_click(cur, gt, spacing)
                    if found is None:
                        break
                    (z, y, x), positive = found
                    point = image.TransformIndexToPhysicalPoint((x, y, z))
                else:
                    options = (suggest_options or {}).get(variant, {})
                    sug = [] if variant == "model-free" else session.suggest(organ, 1, **options)
                    if not sug:
                        sug = session.suggest(organ, 1, model_free=True)
                    if not sug:
                        break
                    point, positive = sug[0].point_mm, sug[0].positive
                    if polarity == "user":  # the radiologist sees what is there
                        x, y, z = image.TransformPhysicalPointToIndex(point)
                        positive = bool(gt[z, y, x])
                t = time.perf_counter()
                if positive:
                    session.refine(organ, positive=[point])
                else:
                    session.refine(organ, negative=[point])
                seconds.append(time.perf_counter() - t)
                kinds.append("positive" if positive else "negative")
                steps.append(dice(sitk.GetArrayViewFromImage(session.labels) == label, gt))
            while len(steps) < clicks + 1 + (variant == "box"):
                steps.append(steps[-1])  # nothing left to correct: the Dice stays
            out[variant][organ] = {"dice": steps, "auc": auc(steps), "final": steps[-1], "seconds": seconds,
                                   "clicks": kinds, "failure": bool(gt.any() and steps[-1] == 0.0)}
        log(f"{case['name']} {organ}: " + ", ".join(f"{v} {out[v][organ]['dice'][0]:.3f}->{out[v][organ]['final']:.3f}"
                                                     for v in variants))
    out["_auto_seconds"] = t_auto
    return out


def summarise(per_case: dict[str, dict], variants: list[str], organs: list[str]) -> dict:
    summary: dict = {}
    for v in variants:
        summary[v] = {}
        for o in organs:
            recs = [c[v][o] for c in per_case.values() if o in c.get(v, {})]
            if not recs:
                continue
            n_steps = max(len(r["dice"]) for r in recs)
            steps = [[r["dice"][min(i, len(r["dice"]) - 1)] for r in recs] for i in range(n_steps)]
            secs = [s for r in recs for s in r["seconds"]]
            summary[v][o] = {
                "n": len(recs), "failures": int(sum(r["failure"] for r in recs)),
                "dice_mean": [float(np.mean(s)) for s in steps], "dice_sd": [float(np.std(s)) for s in steps],
                "auc_mean": float(np.mean([r["auc"] for r in recs])),
                "final_mean": float(np.mean([r["final"] for r in recs])), "final_sd": float(np.std([r["final"] for r in recs])),
                "seconds_per_step": float(np.mean(secs)) if secs else None,
            }
    return summary


def benchmark_mean(per_organ: dict, organs: list[str]) -> dict | None:
    """The mean over ``organs`` (those scored) of each step's mean Dice, of the AUC and of the final Dice."""
    rows = [per_organ[o] for o in organs if o in per_organ]
    if not rows:
        return None
    n_steps = max(len(r["dice_mean"]) for r in rows)
    return {"organs": [o for o in organs if o in per_organ],
            "dice_mean": [float(np.mean([r["dice_mean"][min(i, len(r["dice_mean"]) - 1)] for r in rows]))
                          for i in range(n_steps)],
            "auc_mean": float(np.mean([r["auc_mean"] for r in rows])),
            "final_mean": float(np.mean([r["final_mean"] for r in rows]))}


def markdown(summary: dict, command: str, hardware: str, benchmark: list[str] | None = None) -> str:
    lines = [f"Command: `{command}`  ", f"Hardware: {hardware}", ""]
    for v, per in summary.items():
        if not per:
            continue
        n_steps = max(len(r["dice_mean"]) for r in per.values())
        head = ["organ", "n"] + [f"step {i}" for i in range(n_steps)] + ["AUC", "final (sd)", "s/step", "failures"]
        lines += [f"**{v}**", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for o, r in per.items():
            sps = "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
            lines.append("| " + " | ".join([o, str(r["n"]), *(f"{d:.3f}" for d in r["dice_mean"]), f"{r['auc_mean']:.3f}",
                                            f"{r['final_mean']:.3f} ({r['final_sd']:.3f})", sps, str(r["failures"])]) + " |")
        bm = benchmark_mean(per, benchmark or [])
        if bm is not None:
            lines.append("| " + " | ".join([f"**mean over the {len(bm['organs'])} benchmark organs**", "",
                                            *(f"**{d:.3f}**" for d in bm["dice_mean"]), f"{bm['auc_mean']:.3f}",
                                            f"{bm['final_mean']:.3f}", "", ""]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--suggest-variant", action="append", default=[], metavar="NAME=JSON",
                    help="also run suggested-NAME: suggested clicks with these suggest_clicks options")
    ap.add_argument("--polarity", choices=("user", "model"), default="user",
                    help="who decides a suggested click's polarity: the radiologist (ground truth at the point) or the "
                         "model's guess")
    ap.add_argument("--held-out", action="store_true",
                    help="the patients the model's training held out (validation), instead of the protocol's test patients")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--organs", nargs="*")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/interactive"))
    ap.add_argument("--doc", type=Path)
    ap.add_argument("--label", default="default", help="names this run's tables in --doc (e.g. suggestions)")
    args = ap.parse_args(argv)

    from MedDiffSegLib.evaluation.protocol import held_out_cases, protocol_cases
    from MedDiffSegLib.registry import ModelPackage, resolve_model

    pkg = ModelPackage.from_folder(args.model) if Path(args.model).is_dir() else resolve_model(args.model)
    pkg.verify()
    method = pkg.load_method(args.device)
    protocol = json.loads((REPO / "bench" / "protocol.json").read_text())
    root = Path(os.environ.get("MEDDIFFSEG_DATA") or REPO.parent / "shared" / "data")
    if args.held_out:
        cases = held_out_cases(protocol, (pkg.provenance or {}).get("config", {}), pkg.organ_names, root, args.cases)
        if not cases:
            ap.error(f"{pkg.name} records no held-out (validation) patients in its training config")
    else:
        cases = [c for c in protocol_cases(protocol, pkg.preprocessing.modality, pkg.organ_names, root, args.cases)
                 if c["role"] == "test"]
    suggest_options: dict[str, dict] = {}
    for item in args.suggest_variant:
        name, _, text = item.partition("=")
        try:
            suggest_options[f"suggested-{name}"] = json.loads(text)
        except json.JSONDecodeError as exc:
            ap.error(f"--suggest-variant {item!r}: not NAME=JSON ({exc})")
    variants = list(args.variants) + [v for v in suggest_options if v not in args.variants]
    per_case: dict[str, dict] = {}
    organs_all: list[str] = []
    benchmark = [o for o in (cases[0].get("benchmark") or []) if o in pkg.organ_names] if cases else []
    for case in cases:
        organs = [o for o in case["organs"] if not args.organs or o in args.organs]
        organs_all += [o for o in organs if o not in organs_all]
        per_case[case["name"]] = run_case(case, pkg, method, organs, variants, args.clicks, args.samples,
                                          args.device, polarity=args.polarity, suggest_options=suggest_options)
        for v in variants:
            (args.out / v).mkdir(parents=True, exist_ok=True)
            (args.out / v / f"{case['name']}.json").write_text(json.dumps(per_case[case["name"]][v], indent=1))
    summary = summarise(per_case, variants, organs_all)
    command = "python bench/evaluate_interactive.py " + " ".join(argv if argv is not None else sys.argv[1:])
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.device}"
    means = {v: benchmark_mean(summary[v], benchmark) for v in variants}
    (args.out / "summary.json").write_text(json.dumps({"command": command, "model": pkg.name, "version": pkg.version,
                                                       "cases": list(per_case), "polarity": args.polarity,
                                                       "suggest_options": suggest_options,
                                                       "summary": summary, "benchmark_mean": means}, indent=1))
    text = markdown(summary, command, hardware, benchmark)
    if any(v not in ("auto", "box") for v in variants):
        text = text.replace("\n\n", f"  \nCases: {', '.join(per_case)}; a suggested click's polarity: "
                            + ("the radiologist's (ground truth at the point)" if args.polarity == "user"
                               else "the model's guess") + "\n\n", 1)
    print(text)
    if args.doc:
        write_doc_block(args.doc, f"interactive:{pkg.name}:{args.label}", f"### {pkg.name} {pkg.version} — {args.label}\n\n"
                        + text, title="# Interactive correction")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
