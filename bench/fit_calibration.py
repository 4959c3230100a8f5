#!/usr/bin/env python
"""Fit a package's per-organ probability temperatures on the protocol's *training* patients.

    python bench/fit_calibration.py MODEL [--held-out] [--band-mm 10] [--max-voxels 300000] [--record]

``--held-out`` fits on the training patients the model's own training held out (the validation
patients of its config), which the model has not seen: the temperatures then do not
under-correct. Without it, every protocol training patient is used (the caveat below).

Each training case of ``bench/protocol.json`` of the package's modality (patients the model was
trained on; the test patients stay unseen) is segmented with the package's default sampling
setting and seed 0, every labelled organ prompted, and the organ's raw mean probability is
collected on the voxels within ``--band-mm`` of the predicted or true organ (at most
``--max-voxels`` per organ and case, drawn at random with a fixed seed). One temperature per
organ is fitted by minimising the NLL (:func:`MedDiffSegLib.uncertainty.calibration.fit_temperature`).

Caveat, stated wherever the numbers are used: a model is more confident on patients it was
trained on, so temperatures fitted there under-correct; the test patients' ECE
(``bench/evaluate_uncertainty.py``) is the check. ``--record`` writes ``inference.calibration``
into the package's ``model.json`` (atomic; weights untouched).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--protocol", type=Path, default=REPO / "bench" / "protocol.json")
    ap.add_argument("--band-mm", type=float, default=10.0)
    ap.add_argument("--max-voxels", type=int, default=300_000)
    ap.add_argument("--cases", nargs="+", help="only these training cases (a quick check; not for recording)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--held-out", action="store_true",
                    help="fit on the patients the model's training held out (its config's validation cases) instead "
                         "of the patients it was trained on: temperatures that do not under-correct")
    args = ap.parse_args(argv)

    import dataclasses

    import SimpleITK as sitk

    from evaluate_protocol import _data_root
    from MedDiffSegLib.evaluation.evaluate import on_reference_grid
    from MedDiffSegLib.evaluation.uncertainty import near_band
    from MedDiffSegLib.inference import segment_volume
    from MedDiffSegLib.io import read_volume
    from MedDiffSegLib.registry import resolve_model
    from MedDiffSegLib.registry.package import update_inference
    from MedDiffSegLib.training.datasets import read_dataset
    from MedDiffSegLib.uncertainty.calibration import fit_temperature

    protocol = json.loads(args.protocol.read_text(encoding="utf-8"))
    pkg = resolve_model(args.model)
    raw = dataclasses.replace(pkg, inference={k: v for k, v in pkg.inference.items() if k != "calibration"})
    method = pkg.load_method("cpu")
    rng = np.random.default_rng(0)
    collected: dict[str, tuple[list, list]] = {}
    fitted_on = []
    held_out: set[str] = set()
    if args.held_out:
        cfg = (pkg.provenance or {}).get("config") or {}
        held_out = {c for e in cfg.get("validation", []) for c in (e.get("cases") or [])}
        if not held_out:
            ap.error(f"{pkg.name} records no held-out (validation) patients in its training config")
    for key, d in protocol["datasets"].items():
        if d["modality"] != pkg.preprocessing.modality:
            continue
        ds = read_dataset(_data_root() / d["dataset"])
        by_name = {c.name: c for c in ds.cases("training")}
        organs = [o for o in pkg.organ_names if o in ds.labels]
        for name in (sorted(held_out & set(by_name)) if args.held_out else d["train"]):
            if args.cases and name not in args.cases:
                continue
            if name in d["test"]:
                raise SystemExit(f"{name} is a test patient of the protocol: never used for fitting")
            c = by_name[name]
            image = read_volume(c.image)
            truth, _ = on_reference_grid(sitk.ReadImage(str(c.label)), image, "the ground truth", "the image")
            g_all = sitk.GetArrayFromImage(truth)
            spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
            t0 = time.perf_counter()
            res = segment_volume(image, raw, organs, seed=0, method=method, keep_probabilities=True)
            labels = sitk.GetArrayViewFromImage(res.labels)
            for i, organ in enumerate(organs, start=1):
                pred, gt = labels == i, g_all == int(ds.labels[organ])
                band = near_band(pred, gt, spacing, args.band_mm)
                if not band.any():
                    continue
                p = sitk.GetArrayFromImage(res.probabilities[organ])[band]
                y = gt[band]
                if p.size > args.max_voxels:
                    keep = rng.choice(p.size, args.max_voxels, replace=False)
                    p, y = p[keep], y[keep]
                collected.setdefault(organ, ([], []))[0].append(p)
                collected[organ][1].append(y)
            fitted_on.append(name)
            print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    fits = {o: fit_temperature(np.concatenate(ps), np.concatenate(ys)) for o, (ps, ys) in collected.items()}
    for o, f in fits.items():
        print(f"{o}: T = {f['temperature']:.3f} (NLL {f['nll_before']:.4f} -> {f['nll_after']:.4f}, {f['voxels']} voxels)")
    calibration = {
        "method": "temperature",
        "temperature": {o: round(f["temperature"], 4) for o, f in fits.items()},
        "fitted_on": fitted_on,
        "setting": {"samples": int(pkg.inference.get("samples", 1)), "steps": int(pkg.inference.get("steps", 1)), "seed": 0},
        "band_mm": args.band_mm,
        "nll": {o: [round(f["nll_before"], 5), round(f["nll_after"], 5)] for o, f in fits.items()},
        "note": ("fitted on patients held out of the model's training (its validation patients); "
                 if args.held_out else
                 "fitted on the protocol's training patients (seen in training: temperatures under-correct); ")
                + "check: bench/evaluate_uncertainty.py on the test patients",
        "command": "python bench/fit_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(calibration, indent=1))
    if args.record:
        if args.cases:
            print("--record needs every training case (drop --cases)", file=sys.stderr)
            return 2
        update_inference(pkg.path, {"calibration": calibration})
        print(f"recorded in {Path(pkg.path) / 'model.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
