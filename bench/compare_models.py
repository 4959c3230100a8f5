#!/usr/bin/env python
"""Print the method comparison tables of docs/methods.md from the packages' protocol scores.

    python bench/compare_models.py PACKAGE [PACKAGE ...] [--dataset btcv]
    python bench/compare_models.py                    # every built-in package with protocol scores

Each package's ``model.json`` holds under ``metrics.protocol`` what ``bench/evaluate_protocol.py
--record`` measured on the protocol's test patients (``bench/protocol.json``). This prints, for one
dataset of the protocol:

1. one row per package: method, parameters, steps × samples, the mean Dice over the benchmark
   organs (mean ± sd over the test patients at the first seed, n, and the sd of that mean over
   the seeds), mean HD95, failures (organs missed or hallucinated), seconds per case and the
   training cost (wall time, amp, the number of processes);
2. Dice per organ (mean ± sd over the patients; failures apart, marked ``(k failed)``), every organ
   that any package scored.

Packages without protocol scores for the dataset are listed with "—". Nothing is computed again:
the numbers are the recorded ones, with the command that produced them in each package.

With ``--extras DIR`` (what ``bench/evaluate_seeds.sh`` writes beside the packages) a third table
gives, per package, how far its uncertainty can be trusted and what a volume costs:
``DIR/uncertainty/<package>/summary.json`` (``bench/evaluate_uncertainty.py --settings 1x5``:
near-organ AUROC of the variance and of the entropy, ECE, over the organ-cases of the test
patients) and ``DIR/speed/<package>.one.json`` and ``.all.json`` (``bench/bench_segment.py --json-out``, 1 sample:
seconds and peak memory for the liver alone and for all the package's organs, per 512×512×200 CT).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _f(v, nd: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, str) or math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def _results(pkg, dataset: str) -> tuple[dict | None, dict]:
    """``(results of ``dataset`` or None, the protocol record)`` of a package."""
    proto = pkg.metrics.get("protocol") or {}
    return (proto.get("results") or {}).get(dataset), proto


def _benchmark_organs(dataset: str) -> list[str]:
    protocol = json.loads((REPO / "bench" / "protocol.json").read_text(encoding="utf-8"))
    return list(protocol["datasets"][dataset]["organs"])


def _first_seed(res: dict) -> dict:
    per_seed = res["per_seed"]
    return per_seed[sorted(per_seed, key=int)[0]]


def _seed_sd_of_mean(res: dict, organs: list[str]) -> float | None:
    """sd over the seeds of the mean Dice over ``organs`` (None with one seed)."""
    means = []
    for s in res["per_seed"].values():
        vals = [s["organs"][o]["dice_mean"] for o in organs if o in s["organs"]]
        if vals:
            means.append(sum(vals) / len(vals))
    if len(means) < 2:
        return None
    m = sum(means) / len(means)
    return math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1))


def _case_means(res: dict, organs: list[str]) -> list[float]:
    """The mean Dice over ``organs`` of each test patient at the first seed."""
    out = []
    for per_organ in (res.get("dice_per_case_first_seed") or {}).values():
        vals = [per_organ[o] for o in organs if per_organ.get(o) is not None]
        if vals:
            out.append(sum(vals) / len(vals))
    return out


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    sd = math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _training(pkg) -> str:
    prov = pkg.provenance
    wall = prov.get("wall_time_s")
    if wall is None:
        return "—"
    procs = (prov.get("hardware") or {}).get("processes", 1)
    amp = prov.get("amp", "off")
    return f"{wall / 60:.0f} min × {procs} proc." + ("" if amp in ("off", None) else f", {amp}")


def tables(packages, dataset: str = "btcv") -> str:
    bench = _benchmark_organs(dataset)
    head = ("| package | method | parameters | steps × samples | mean Dice over the benchmark organs (± sd over patients, n) | "
            "sd over seeds | mean HD95 (mm) | failures | s / case | training |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    organ_rows, scored = [], []
    for p in packages:
        res, proto = _results(p, dataset)
        params = p.provenance.get("parameters")
        name = f"| `{p.name}` {p.version} | `{p.method_name}` | {_f(params / 1e6 if params else None, 2)} M |"
        if res is None:
            lines.append(f"{name} — | — | — | — | — | — | {_training(p)} |")
            continue
        first = _first_seed(res)
        case_means = _case_means(res, bench)
        m, sd = _mean_sd(case_means)
        hd = [first["organs"][o]["hd95_mean"] for o in bench if o in first["organs"]]
        failures = sum(int(o.get("missed", 0)) + int(o.get("hallucinated", 0)) for o in first["organs"].values())
        seed_sd = _seed_sd_of_mean(res, bench)
        lines.append(f"{name} {proto.get('steps', '—')} × {proto.get('samples', '—')} | "
                     f"{_f(m, 3)} ± {_f(sd, 3)} ({len(case_means)}) | "
                     f"{_f(seed_sd, 4) if seed_sd is not None else '— (1 seed)'} | "
                     f"{_f(sum(hd) / len(hd) if hd else None, 1)} | {failures} | "
                     f"{_f(res.get('seconds_per_case_median'), 1)} | {_training(p)} |")
        organ_rows.append((p, first))
        scored.extend(o for o in first["organs"] if o not in scored)
    organs = [o for o in bench if o in scored] + [o for o in scored if o not in bench]
    out = ["\n".join(lines)]
    if organ_rows:
        head = "| package | " + " | ".join(organs) + " |"
        rows = [head, "|" + " --- |" * (len(organs) + 1)]
        for p, first in organ_rows:
            cells = []
            for o in organs:
                s = first["organs"].get(o)
                if s is None:
                    cells.append("—")
                    continue
                fails = int(s.get("missed", 0)) + int(s.get("hallucinated", 0))
                cells.append(f"{_f(s['dice_mean'], 3)} ± {_f(s['dice_sd'], 3)}" + (f" ({fails} failed)" if fails else ""))
            rows.append(f"| `{p.name}` | " + " | ".join(cells) + " |")
        out.append(f"Dice per organ on the `{dataset}` test patients (first seed, mean ± sd over the patients):\n\n"
                   + "\n".join(rows))
    return "\n\n".join(out)


def extras_table(packages, extras: Path, setting: str = "1x5") -> str:
    """Uncertainty (near-organ AUROC, ECE at ``setting``) and cost per 512×512×200 volume, from ``extras``."""
    head = (f"| package | AUROC near, variance ({setting}) | AUROC near, entropy | ECE near | organ-cases | "
            "s / volume, 1 organ × 1 sample | s / volume, all organs × 1 sample | peak memory (MB) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    hardware = set()
    for p in packages:
        cells = ["—"] * 7
        unc = extras / "uncertainty" / p.name / "summary.json"
        if unc.is_file():
            agg = (json.loads(unc.read_text()).get("settings") or {}).get(setting) or {}
            for i, key in enumerate(("variance_auroc_near", "entropy_auroc_near", "ece_near")):
                m, sd, n = agg.get(key) or (None, None, 0)
                cells[i] = f"{_f(m, 3)} ± {_f(sd, 3)}" if m is not None else "—"
                cells[3] = str(n) if n else cells[3]
        runs = {}
        for what in ("one", "all"):  # bench_segment.py --json-out files: one organ, and every organ
            f = extras / "speed" / f"{p.name}.{what}.json"
            ok = [r for r in (json.loads(f.read_text()).get("runs") or []) if "error" not in r] if f.is_file() else []
            if ok:
                runs[what] = ok[0]
                hardware.add(f"{ok[0].get('device')}, {ok[0].get('cpu_count')} cores, "
                             f"{ok[0].get('torch_threads')} torch threads")
        cells[4] = _f(runs["one"]["wall_seconds"], 1) if "one" in runs else "—"
        cells[5] = _f(runs["all"]["wall_seconds"], 1) if "all" in runs else "—"
        cells[6] = _f(max(r["peak_rss_mb"] for r in runs.values()), 0) if runs else "—"
        lines.append(f"| `{p.name}` | " + " | ".join(cells) + " |")
    note = f"\n\nHardware: {'; '.join(sorted(hardware))}" if hardware else ""
    return "\n".join(lines) + note


def main(argv=None) -> int:
    from MedDiffSegLib.registry import ModelPackage
    from MedDiffSegLib.registry.store import builtin_models_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", nargs="*", type=Path, help="package folders (default: the built-in ones)")
    ap.add_argument("--dataset", default="btcv", help="protocol dataset to compare on (default: btcv)")
    ap.add_argument("--extras", type=Path, help="also the uncertainty and cost table from this folder (see above)")
    args = ap.parse_args(argv)
    folders = args.packages or sorted(d for d in builtin_models_dir().iterdir() if (d / "model.json").is_file())
    packages = [ModelPackage.from_folder(f) for f in folders]
    print(tables(packages, args.dataset))
    if args.extras:
        print("\n" + extras_table(packages, args.extras))
    return 0


if __name__ == "__main__":
    sys.exit(main())
