#!/usr/bin/env python
"""Print the method comparison tables of docs/methods.md from the packages' recorded scores.

    python bench/compare_models.py [PACKAGE ...]      # default: every built-in package

Each package's ``model.json`` holds under ``metrics.evaluation`` what ``bench/evaluate_model.sh``
measured (written by ``bench/record_evaluation.py``). This prints two Markdown tables: the
unseen patient (Dice, HD95) with the evaluation settings and parameters, and the Dice per organ
on each training patient. Packages without recorded scores are listed with "—".
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from record_evaluation import CASES  # noqa: E402  (the cases of evaluate_model.sh, unseen first)

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder", "aorta")
UNSEEN, *TRAINING = CASES


def _f(v, nd: int) -> str:
    if v is None:
        return "—"
    if isinstance(v, str) or math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def _organ(case: dict | None, organ: str, key: str, nd: int) -> str:
    o = (case or {}).get("organs", {}).get(organ)
    if o is None:
        return "—"
    text = _f(o[key], nd)
    return f"{text} ({o['status']})" if o["status"] not in ("ok",) else text


def tables(packages) -> str:
    lines = ["| package | method | parameters | steps × samples | unseen liver Dice | unseen liver HD95 (mm) | "
             "training CTs: mean Dice | training CTs: mean HD95 (mm) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_organ = {case: [] for case in TRAINING}
    for p in packages:
        ev = p.metrics.get("evaluation", {})
        st = p.metrics.get("settings", {})
        params = p.provenance.get("parameters")
        means, hd95 = [], []
        for case in TRAINING:  # organs absent from both maps are left out of the means; failures count
            organs = [o for o in ev.get(case, {}).get("organs", {}).values() if o["status"] != "both_empty"]
            means.append(_f(sum(o["dice"] for o in organs) / len(organs), 3) if organs else "—")
            hd = [math.inf if isinstance(o["hd95_mm"], str) else o["hd95_mm"] for o in organs]
            hd95.append(_f(sum(hd) / len(hd), 1) if hd else "—")
        setting = f"{st['steps']} × {st['samples']}" if st else "—"
        lines.append(f"| `{p.name}` | `{p.method_name}` | {_f(params / 1e6 if params else None, 2)} M | {setting} | "
                     f"{_organ(ev.get(UNSEEN), 'liver', 'dice', 3)} | {_organ(ev.get(UNSEEN), 'liver', 'hd95_mm', 2)} | "
                     f"{' / '.join(means)} | {' / '.join(hd95)} |")
        for case in TRAINING:
            per_organ[case].append(f"| `{p.name}` | " + " | ".join(_organ(ev.get(case), o, "dice", 3) for o in ORGANS) + " |")
    out = ["\n".join(lines)]
    for case in TRAINING:
        head = "| package | " + " | ".join(ORGANS) + " |"
        out.append(f"Dice per organ, training patient `{case}`:\n\n{head}\n|" + " --- |" * (len(ORGANS) + 1) + "\n"
                   + "\n".join(per_organ[case]))
    return "\n\n".join(out)


def main(argv=None) -> int:
    from MedDiffSegLib.registry import ModelPackage
    from MedDiffSegLib.registry.store import builtin_models_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", nargs="*", type=Path, help="package folders (default: the built-in ones)")
    args = ap.parse_args(argv)
    folders = args.packages or sorted(d for d in builtin_models_dir().iterdir() if (d / "model.json").is_file())
    print(tables([ModelPackage.from_folder(f) for f in folders]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
