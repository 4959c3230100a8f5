#!/usr/bin/env python
"""Choose each organ's post-processing the way nnU-Net does, on held-out training patients only.

    python bench/choose_postprocessing.py MODEL [--cases A B ...] [--record] [--json-out F]

The cases default to the ``validation`` entries of the model's training config (patients held
out of training, never the protocol's test patients: the script refuses those). Each case is
segmented once, all organs prompted together (1 sample, seed 0, no post-processing); then, per
organ, keeping only the largest 3D connected component is compared with the raw result. As in
nnU-Net, it is kept for an organ when it does not lower that organ's mean Dice over the cases
and raises it, or lowers the mean HD95 (islands far from the organ are what HD95 sees);
otherwise the raw result stays. ``--record`` writes the chosen organs into the package's
``inference.largest_component`` (atomically; weights untouched), which the engine then applies by
default (``--no-largest-component`` turns it off for a run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def choose(per_case: dict[str, dict[str, dict[str, float]]], organs: list[str]) -> dict[str, dict]:
    """Per organ: mean Dice and HD95 raw and with the largest component, and whether to keep it."""
    out = {}
    for o in organs:
        rows = [c[o] for c in per_case.values() if o in c]
        if not rows:
            continue

        def mean(key):
            v = [r[key] for r in rows]
            finite = [x for x in v if math.isfinite(x)]
            return float(np.mean(v)) if len(finite) == len(v) else float("inf")

        d_raw, d_lc = mean("dice_raw"), mean("dice_lc")
        h_raw, h_lc = mean("hd95_raw"), mean("hd95_lc")
        keep = d_lc >= d_raw - 1e-9 and (d_lc > d_raw + 1e-9 or h_lc < h_raw - 1e-9)
        out[o] = {"n": len(rows), "dice_raw": d_raw, "dice_largest_component": d_lc, "hd95_raw": h_raw,
                  "hd95_largest_component": h_lc, "keep_largest_component": bool(keep)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--config", type=Path, help="the model's training config (default: from its provenance)")
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    import SimpleITK as sitk

    from MedDiffSegLib.evaluation.metrics import mask_metrics
    from MedDiffSegLib.inference.engine import segment_volume
    from MedDiffSegLib.io import read_volume
    from MedDiffSegLib.registry import ModelPackage, resolve_model
    from MedDiffSegLib.registry.package import update_inference
    from MedDiffSegLib.training.data import _labels_on_image_grid
    from MedDiffSegLib.training.datasets import read_dataset
    from MedDiffSegLib.uncertainty import keep_largest_component

    pkg = ModelPackage.from_folder(args.model) if Path(args.model).is_dir() else resolve_model(args.model)
    pkg.verify()
    root = Path(os.environ.get("MEDDIFFSEG_DATA") or REPO.parent / "shared" / "data")
    cfg = json.loads(args.config.read_text()) if args.config else (pkg.provenance or {}).get("config", {})
    entries = [e for e in cfg.get("validation", []) if "dataset" in e]
    protocol = json.loads((REPO / "bench" / "protocol.json").read_text())
    tests = {c for d in protocol["datasets"].values() for c in d["test"]}
    cases = []
    for e in entries:
        ds = read_dataset(root / e["dataset"])
        for c in ds.cases("training"):
            if (args.cases and c.name in args.cases) or (not args.cases and c.name in (e.get("cases") or [])):
                cases.append((c, ds.labels))
    if not cases:
        ap.error("no validation cases: give --cases or a model whose training config has 'validation' datasets")
    bad = [c.name for c, _ in cases if c.name in tests]
    if bad:
        ap.error(f"{', '.join(bad)} are the protocol's test patients: choices are made on held-out training patients only")
    method = pkg.load_method("cpu")
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    for case, table in cases:
        image = read_volume(case.image)
        gt = sitk.GetArrayFromImage(_labels_on_image_grid(sitk.ReadImage(str(case.label)), image))
        organs = [o for o in pkg.organ_names if o in table]
        res = segment_volume(image, pkg, organs, samples=1, seed=0, largest_component=False, method=method)
        lab = sitk.GetArrayFromImage(res.labels)
        spacing = tuple(float(v) for v in image.GetSpacing()[::-1])
        per_case[case.name] = {}
        for i, o in enumerate(organs, start=1):
            pred, truth = lab == i, gt == table[o]
            lc = keep_largest_component(pred) if pred.any() else pred
            d0, h0, _, _ = mask_metrics(pred, truth, spacing)
            d1, h1, _, _ = mask_metrics(lc, truth, spacing)
            per_case[case.name][o] = {"dice_raw": d0, "hd95_raw": h0, "dice_lc": d1, "hd95_lc": h1}
        print(f"{case.name}: " + ", ".join(f"{o} {v['dice_raw']:.3f}/{v['dice_lc']:.3f}"
                                          for o, v in per_case[case.name].items()), file=sys.stderr)
    chosen = choose(per_case, pkg.organ_names)
    keep = [o for o, r in chosen.items() if r["keep_largest_component"]]
    report = {"model": pkg.name, "version": pkg.version, "cases": [c.name for c, _ in cases], "organs": chosen,
              "largest_component": keep,
              "command": "python bench/choose_postprocessing.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(report, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    if args.record:
        update_inference(pkg.path, {"largest_component": keep,
                                    "postprocessing_chosen_on": report["cases"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
