#!/usr/bin/env python
"""Score a model package under the real-data protocol (bench/protocol.json): test patients only.

    python bench/evaluate_protocol.py MODEL [--seeds 0 1 2] [--samples N] [--steps K]
        [--out DIR] [--doc docs/evaluation.md] [--record] [--cases A B ...] [--label TEXT] [--resume]

For every dataset of ``bench/protocol.json`` whose modality is the package's, each **test**
case (patients used for nothing else: no training, no tuning, no choice between runs) is
segmented with the package's organs that the dataset labels (all prompted together, as a user
would), once per seed, and scored with :func:`MedDiffSegLib.evaluation.evaluate` (Dice, HD95,
ASSD in mm; failures counted apart). The protocol's ``extra`` volumes of the package's modality
are scored too (a non-contrast CT and an MR of another sequence from other hospitals, with
model-made labels: a check that organs are still found, not a benchmark). Prints per-organ mean ± sd over cases with the number of cases,
failures apart, and the sd over seeds; writes

- ``DIR/<dataset>/seed<S>/<case>.json``: every case report, with the segmentation time;
- ``DIR/summary.json``: the aggregated numbers;
- with ``--doc``: the tables into that Markdown file, between markers for this model (and
  label), replacing the previous tables of the same model and label;
- with ``--record``: the summary under ``metrics.protocol`` in the package's ``model.json``
  (atomic; weights untouched), including each case's Dice at the first seed, which
  ``Testing/models`` reproduces.

Threads: set ``OMP_NUM_THREADS`` as for any run; the command line is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA") or REPO.parent / "shared" / "data")


def _cases(protocol: dict, pkg, only: list[str] | None) -> list[dict]:
    from MedDiffSegLib.evaluation.protocol import protocol_cases

    return protocol_cases(protocol, pkg.preprocessing.modality, pkg.organ_names, _data_root(), only)


def write_doc_block(doc: Path, key: str, text: str, title: str = "# Evaluation under the real-data protocol") -> None:
    """Put ``text`` between the markers ``<!-- KEY:start -->`` / ``<!-- KEY:end -->`` of ``doc``, replacing
    what they held (appended when they are not there yet; a missing ``doc`` starts with ``title``); atomic."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    body = doc.read_text(encoding="utf-8") if doc.is_file() else f"{title}\n\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, doc)


def _write_doc(doc: Path, model: str, label: str, text: str) -> None:
    write_doc_block(doc, f"protocol:{model}:{label}", text)


def _earlier_report(path: Path, made_with: dict) -> dict | None:
    """The case report at ``path`` when it was made with exactly ``made_with`` (weights, settings), else None."""
    if not path.is_file():
        return None
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) and rep.get("made_with") == made_with else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="installed package name or package folder")
    ap.add_argument("--protocol", type=Path, default=REPO / "bench" / "protocol.json")
    ap.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                    help="draw every sample in every window (the engine's adaptive sampling off)")
    ap.add_argument("--body-crop", dest="crop_body", action=argparse.BooleanOptionalAction, default=None,
                    help="windows cut to the body's in-plane box, or not (default: the package's inference.body_crop)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="network arithmetic (the engine's precision; default auto)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--samples", type=int, help="samples per organ (default: the package's)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the package's)")
    ap.add_argument("--out", type=Path, help="folder for the per-case reports (default bench/results/protocol-MODEL)")
    ap.add_argument("--doc", type=Path, help="write the tables into this Markdown file")
    ap.add_argument("--label", default="default", help="names this evaluation in --doc (e.g. an ablation arm)")
    ap.add_argument("--record", action="store_true", help="record the summary in the package's model.json")
    ap.add_argument("--cases", nargs="+", help="score only these cases (a quick check; not for reporting)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the case reports already in --out that were made with the same weights and settings "
                         "(an interrupted run continues where it stopped)")
    ap.add_argument("--from-summary", type=Path, metavar="SUMMARY_JSON",
                    help="compute nothing: take the numbers of an earlier run's summary.json (it must be of MODEL's "
                         "weights, same sha256) and only print / --doc / --record them")
    args = ap.parse_args(argv)

    import SimpleITK as sitk
    import torch

    from MedDiffSegLib.evaluation import LabelSpec, evaluate, to_json_ready
    from MedDiffSegLib.evaluation.protocol import aggregate, markdown_table, seed_spread
    from MedDiffSegLib.inference import segment_volume
    from MedDiffSegLib.inference.device import device_description
    from MedDiffSegLib.io import read_volume
    from MedDiffSegLib.registry import resolve_model
    from MedDiffSegLib.registry.package import _write_json_atomic, update_metrics

    protocol = json.loads(args.protocol.read_text(encoding="utf-8"))
    pkg = resolve_model(args.model)
    if args.from_summary:
        summary = json.loads(args.from_summary.read_text(encoding="utf-8"))
        pkg.verify()
        if summary.get("weights_sha256") != pkg.weights_sha256:
            print(f"{args.from_summary} scores other weights (sha256 {summary.get('weights_sha256')}) than "
                  f"{pkg.name} ({pkg.weights_sha256})", file=sys.stderr)
            return 2
        return _report(summary, pkg, args, update_metrics)
    method = pkg.load_method("cpu")  # verifies the sha256
    # the package's inference settings (post-processing, threshold, calibration...) change the labels as much as the
    # weights do: a report made before `choose_postprocessing.py --record`, say, is not reused after it
    inference = to_json_ready(pkg.inference)  # as the report stores it, so a stored one compares equal
    cases = _cases(protocol, pkg, args.cases)
    if not cases:
        print(f"no protocol case fits {pkg.name} ({pkg.preprocessing.modality})", file=sys.stderr)
        return 2
    out = args.out or REPO / "bench" / "results" / f"protocol-{pkg.name}"
    samples = args.samples or int(pkg.inference.get("samples", 1))
    steps = args.steps or int(pkg.inference.get("steps", 1))
    command = "python bench/evaluate_protocol.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, dict] = {}
    for group in dict.fromkeys(c["group"] for c in cases):
        group_cases = [c for c in cases if c["group"] == group]
        per_seed = []
        per_case: dict[str, dict[str, float]] = {}
        times = []
        images = {c["name"]: read_volume(c["image"]) for c in group_cases}  # read once, segmented per seed
        truths = {c["name"]: sitk.ReadImage(str(c["label"])) for c in group_cases}
        for seed in args.seeds:
            reports = []
            for c in group_cases:
                dst = out / group / f"seed{seed}" / f"{c['name']}.json"
                made_with = {"weights_sha256": pkg.weights_sha256, "samples": samples, "steps": steps,
                             "organs": list(c["organs"]), "precision": args.precision, "adaptive": args.adaptive,
                             "crop_body": args.crop_body, "inference": inference}
                rep = _earlier_report(dst, made_with) if args.resume else None
                if rep is None:
                    t0 = time.perf_counter()
                    res = segment_volume(images[c["name"]], pkg, c["organs"], samples=samples, steps=steps, seed=seed,
                                         method=method, adaptive=args.adaptive, crop_body=args.crop_body,
                                         precision=args.precision)
                    seconds = time.perf_counter() - t0
                    specs = [LabelSpec(o, i + 1, int(c["table"][o])) for i, o in enumerate(c["organs"])]
                    rep = evaluate(res.labels, truths[c["name"]], specs)
                    rep.update({"case": c["name"], "seed": seed, "segment_seconds": round(seconds, 2),
                                "made_with": made_with})
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _write_json_atomic(dst, to_json_ready(rep))
                    how = f"{seconds:.1f} s"
                else:
                    how = "the earlier report"
                times.append(float(rep["segment_seconds"]))
                reports.append(rep)
                if seed == args.seeds[0]:
                    per_case[c["name"]] = {o["name"]: round(float(o["dice"]), 4) for o in rep["organs"]}
                dice = ", ".join(f"{o['name']} {o['dice']:.3f}" for o in rep["organs"])
                print(f"[{group} seed {seed}] {c['name']}: {dice} ({how})", file=sys.stderr)
            per_seed.append(aggregate(reports, [o for o in pkg.organ_names if o in group_cases[0]["organs"]],
                                      benchmark=group_cases[0].get("benchmark") or None))
        results[group] = {"role": group_cases[0]["role"], "cases": [c["name"] for c in group_cases],
                          "per_seed": {str(s): a for s, a in zip(args.seeds, per_seed)},
                          "seed_spread": seed_spread(per_seed) if len(per_seed) > 1 else None,
                          "dice_per_case_first_seed": per_case,
                          "seconds_per_case_median": round(float(sorted(times)[len(times) // 2]), 1)}

    hardware = f"{device_description(torch.device('cpu'))}, {torch.get_num_threads()} thread(s), {platform.machine()}"
    summary = {"model": pkg.name, "version": pkg.version, "weights_sha256": pkg.weights_sha256,
               "samples": samples, "steps": steps, "seeds": args.seeds, "label": args.label,
               "hardware": hardware, "command": command, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    summary = to_json_ready(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return _report(summary, pkg, args, update_metrics)


def _report(summary: dict, pkg, args, update_metrics) -> int:
    """Print the tables of ``summary``; write them into ``--doc`` and the numbers into the package (``--record``)."""
    from MedDiffSegLib.evaluation.protocol import markdown_table

    seeds = summary["seeds"]
    lines = [f"### {pkg.name} {pkg.version} — {args.label}", "",
             f"`{summary['command']}` ({summary['samples']} sample(s) × {summary['steps']} step(s), seeds {seeds}; "
             f"{summary['hardware']})", ""]
    for group, r in summary["results"].items():
        first = r["per_seed"][str(seeds[0])]
        lines += [f"**{group}** ({r['role']}; {len(r['cases'])} cases: {', '.join(r['cases'])}; "
                  f"median {r['seconds_per_case_median']} s per case). Seed {seeds[0]}:", "",
                  markdown_table(first, r["seed_spread"]), ""]
    text = "\n".join(lines)
    print(text)
    if args.doc:
        _write_doc(args.doc, pkg.name, args.label, text)
    if args.record:
        update_metrics(pkg.path, {"protocol": summary})
        print(f"recorded in {pkg.path / 'model.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
