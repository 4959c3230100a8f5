"""Scores over many patients: per-organ mean ± sd with the number of cases, failures apart.

One case's report (from :func:`~MedDiffSegLib.evaluation.evaluate.evaluate`) scores each organ
once. Over a test set, :func:`aggregate` summarises every organ as

- **Dice**: mean ± sd (sample sd, ``ddof=1``) over the cases whose ground truth has the organ;
  a missed organ counts with Dice 0 (it is a real, finite result), and is also counted as a
  failure;
- **HD95** (and ASSD): mean ± sd over the cases where both masks are non-empty (a distance to
  an empty mask is undefined, never averaged in as infinity), with the failures beside it;
- **failures**: ``missed`` (organ in the ground truth, nothing predicted) and ``hallucinated``
  (nothing in the ground truth, something predicted), counted apart;
- cases where both are empty are counted (``absent``) and otherwise left out.

With several seeds (sampling methods), :func:`seed_spread` gives the sd over seeds of each
organ's mean Dice, so a reader can tell a real difference between models from sampling noise.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from .metrics import STATUS_BOTH_EMPTY, STATUS_FALSE_POSITIVE, STATUS_MISSED


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def aggregate(reports: Iterable[dict], organs: Sequence[str] | None = None,
              benchmark: Sequence[str] | None = None) -> dict:
    """Per-organ summary over case reports (``evaluate`` outputs), plus the mean over organs.

    ``organs`` fixes the order (default: as first seen). ``benchmark``: the organs whose mean is the
    headline ``mean_dice`` (e.g. BTCV's 8 Synapse organs, so that a model with more organs stays
    comparable); ``mean_dice_all`` is then the mean over every organ. The result is JSON-ready::

        {"cases": 6, "organs": {"liver": {"n": 6, "dice_mean": .., "dice_sd": .., "hd95_mean": ..,
          "hd95_sd": .., "hd95_n": 6, "assd_mean": .., "missed": 0, "hallucinated": 0, "absent": 0}},
         "mean_dice": .. (mean over organs of the per-organ mean Dice), "failures": ..}
    """
    reports = list(reports)
    per: dict[str, dict[str, list]] = {}
    order: list[str] = list(organs or [])
    for rep in reports:
        for o in rep["organs"]:
            name = o["name"]
            if name not in order:
                order.append(name)
            d = per.setdefault(name, {"dice": [], "hd95": [], "assd": [], "missed": 0, "hallucinated": 0, "absent": 0})
            status = o["status"]
            if status == STATUS_BOTH_EMPTY:
                d["absent"] += 1
                continue
            if status == STATUS_FALSE_POSITIVE:
                d["hallucinated"] += 1
                continue
            d["dice"].append(float(o["dice"]))
            if status == STATUS_MISSED:
                d["missed"] += 1
                continue
            d["hd95"].append(float(o["hd95_mm"]))
            d["assd"].append(float(o["assd_mm"]))
    out_organs: dict[str, dict] = {}
    for name in order:
        d = per.get(name, {"dice": [], "hd95": [], "assd": [], "missed": 0, "hallucinated": 0, "absent": 0})
        dm, ds = _mean_sd(d["dice"])
        hm, hs = _mean_sd(d["hd95"])
        am, as_ = _mean_sd(d["assd"])
        out_organs[name] = {"n": len(d["dice"]), "dice_mean": dm, "dice_sd": ds, "hd95_mean": hm, "hd95_sd": hs,
                            "hd95_n": len(d["hd95"]), "assd_mean": am, "assd_sd": as_, "missed": d["missed"],
                            "hallucinated": d["hallucinated"], "absent": d["absent"]}
    means = [v["dice_mean"] for v in out_organs.values() if v["dice_mean"] is not None]
    bench = [out_organs[o]["dice_mean"] for o in (benchmark or []) if o in out_organs
             and out_organs[o]["dice_mean"] is not None]
    extra = {}
    if benchmark:
        extra = {"benchmark_organs": [o for o in benchmark if o in out_organs],
                 "mean_dice_all": float(np.mean(means)) if means else None}
    return {
        "cases": len(reports),
        "organs": out_organs,
        "mean_dice": (float(np.mean(bench)) if bench else None) if benchmark else (float(np.mean(means)) if means else None),
        **extra,
        "failures": sum(v["missed"] + v["hallucinated"] for v in out_organs.values()),
        "conventions": "Dice over cases with the organ in the ground truth (a missed organ counts 0); HD95/ASSD "
                       "over cases with both masks non-empty; missed and hallucinated organs counted apart; "
                       "sd is the sample standard deviation over cases",
    }


def seed_spread(per_seed: Sequence[dict]) -> dict:
    """sd over seeds of each organ's mean Dice and of the mean over organs (``aggregate`` outputs, one per seed)."""
    if not per_seed:
        return {}
    organs = list(per_seed[0]["organs"])
    out: dict = {"seeds": len(per_seed), "organs": {}}
    for name in organs:
        vals = [a["organs"][name]["dice_mean"] for a in per_seed if a["organs"].get(name, {}).get("dice_mean") is not None]
        m, s = _mean_sd(vals)
        out["organs"][name] = {"dice_mean_over_seeds": m, "dice_sd_over_seeds": s}
    m, s = _mean_sd([a["mean_dice"] for a in per_seed if a["mean_dice"] is not None])
    out["mean_dice_over_seeds"], out["mean_dice_sd_over_seeds"] = m, s
    return out


def _f(v, nd: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{nd}f}"


def markdown_table(agg: dict, spread: dict | None = None) -> str:
    """The per-organ table of an :func:`aggregate` result (Markdown)."""
    rows = ["| organ | n | Dice mean ± sd | HD95 mm mean ± sd (n) | missed | hallucinated |"
            + (" Dice sd over seeds |" if spread else ""),
            "| --- | --- | --- | --- | --- | --- |" + (" --- |" if spread else "")]
    for name, v in agg["organs"].items():
        row = (f"| {name} | {v['n']} | {_f(v['dice_mean'], 3)} ± {_f(v['dice_sd'], 3)} | "
               f"{_f(v['hd95_mean'], 1)} ± {_f(v['hd95_sd'], 1)} ({v['hd95_n']}) | {v['missed']} | {v['hallucinated']} |")
        if spread:
            row += f" {_f(spread['organs'].get(name, {}).get('dice_sd_over_seeds'), 3)} |"
        rows.append(row)
    what = (f"mean over the {len(agg['benchmark_organs'])} benchmark organs" if agg.get("benchmark_organs")
            else "mean over organs")
    mean = f"| **{what}** | {agg['cases']} cases | **{_f(agg['mean_dice'], 3)}** | | {agg['failures']} failures | |"
    if spread:
        mean += f" {_f(spread.get('mean_dice_sd_over_seeds'), 3)} |"
    rows.append(mean)
    if agg.get("benchmark_organs") and len(agg["benchmark_organs"]) < len(agg["organs"]):
        rows.append(f"| mean over all {len(agg['organs'])} organs | | {_f(agg.get('mean_dice_all'), 3)} | | | |"
                    + (" |" if spread else ""))
    return "\n".join(rows)


def protocol_cases(protocol: dict, modality: str, organ_names: Sequence[str], data_root, only: Sequence[str] | None = None
                   ) -> list[dict]:
    """Every (dataset, case) of ``bench/protocol.json`` to score for a model of ``modality``.

    Test cases of each dataset of that modality, then the protocol's ``extra`` volumes of that
    modality. Each entry: ``group``, ``name``, ``image`` and ``label`` paths, the dataset's label
    ``table`` (organ name -> value), the model's ``organs`` that the dataset labels, and ``role``.
    """
    from pathlib import Path

    from ..training.datasets import read_dataset

    root = Path(data_root)
    out = []
    for key, d in protocol["datasets"].items():
        if d["modality"] != modality:
            continue
        ds = read_dataset(root / d["dataset"])
        by_name = {c.name: c for c in ds.cases("training")}
        organs = [o for o in organ_names if o in ds.labels]
        for name in d["test"]:
            if only and name not in only:
                continue
            c = by_name[name]
            out.append({"group": key, "name": name, "image": c.image, "label": c.label, "table": ds.labels,
                        "organs": organs, "role": "test", "benchmark": list(d.get("organs") or [])})
    for e in protocol.get("extra", []):
        if e["modality"] != modality or (only and e["name"] not in only):
            continue
        organs = [o for o in organ_names if o in e["table"]]
        out.append({"group": e["name"], "name": e["name"], "image": root / e["image"], "label": root / e["label"],
                    "table": e["table"], "organs": organs, "role": e["what"]})
    return out


def held_out_cases(protocol: dict, training_config: dict, organ_names: Sequence[str], data_root,
                   only: Sequence[str] | None = None) -> list[dict]:
    """The patients a model's training held out (its config's ``validation`` entries), as :func:`protocol_cases` lists them.

    Choices (post-processing, calibration, suggestion settings) are made on these, never on the
    protocol's test patients: a test patient among them is an :class:`~MedDiffSegLib.errors.InputError`.
    Each entry's ``role`` is ``"validation"``; ``benchmark`` is the protocol's benchmark organs of that
    dataset, when the protocol has the dataset.
    """
    from pathlib import Path

    from ..errors import InputError
    from ..training.datasets import read_dataset

    root = Path(data_root)
    tests = {c for d in protocol["datasets"].values() for c in d["test"]}
    by_file = {d["dataset"]: d for d in protocol["datasets"].values()}
    out = []
    for e in training_config.get("validation") or []:
        if "dataset" not in e:
            continue
        ds = read_dataset(root / e["dataset"])
        organs = [o for o in organ_names if o in ds.labels]
        for c in ds.cases("training"):
            if c.name not in (e.get("cases") or []) or (only and c.name not in only):
                continue
            if c.name in tests:
                raise InputError(f"{c.name} is a test patient of the protocol: choices are made on held-out training "
                                 "patients only")
            out.append({"group": e["dataset"].split("/")[0], "name": c.name, "image": c.image, "label": c.label,
                        "table": ds.labels, "organs": organs, "role": "validation",
                        "benchmark": list((by_file.get(e["dataset"]) or {}).get("organs") or [])})
    return out
