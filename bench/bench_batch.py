#!/usr/bin/env python
"""Studies per hour: ``meddiffseg batch`` (in-process, 1 and 2 Ray workers) against a shell loop of ``segment``.

    python bench/bench_batch.py [--cases 8] [--organ liver] [--samples 1] [--model abdomen-ct]
        [--modes loop loop1 ray1 ray2 inproc] [--repeats 1] [--json-out FILE] [--keep DIR]

The studies are the first ``--cases`` BTCV CTs of ``$MEDDIFFSEG_DATA/btcv/imagesTr`` (default
``../shared/data``), whole. Every mode is one command timed from spawn to exit, into a fresh output
folder:

- ``loop``: ``for f in ...; do meddiffseg segment "$f" ...; done`` in bash: what a user without
  ``batch`` writes (every study pays Python, torch and MONAI start-up and the model load); torch
  takes all cores;
- ``loop1``: the same loop with ``OMP_NUM_THREADS=1`` (one torch thread, as a 1-CPU Ray worker);
- ``ray1``: ``meddiffseg batch STUDIES.csv --workers 1`` (1 CPU, so one torch thread);
- ``ray2``: ``meddiffseg batch ... --workers 2`` (1 CPU, so one torch thread, each);
- ``inproc`` (not run by default): ``meddiffseg batch ... --no-ray``: this process, the model loaded once.

Torch threads are left to each process (``OMP_NUM_THREADS`` is removed from the environment except
for ``loop1``; Ray sets it to a worker's CPUs). With ``--repeats`` the modes alternate, so that the
drift of a shared machine hits all alike. The load average is recorded before and after every run.
Each mode's label maps are compared voxel for voxel with the loop that uses the same torch threads
(``ray1`` and ``ray2`` with ``loop1``, ``inproc`` with ``loop``): the same seed must give the same
labels; across thread counts a few voxels may differ (float summation order).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("loop", "loop1", "ray1", "ray2", "inproc")
DEFAULT_MODES = ("loop", "loop1", "ray1", "ray2")
#: The loop each mode is compared with: the one with the same torch threads.
SAME_THREADS = {"ray1": "loop1", "ray2": "loop1", "inproc": "loop"}


def data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA", REPO.parent / "shared" / "data")).resolve()


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "python": platform.python_version(),
            "platform": platform.platform()}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def command(mode: str, studies: list[tuple[str, Path]], csv_path: Path, out: Path, args) -> list[str]:
    common = ["--organ", args.organ, "--samples", str(args.samples), "--model", args.model, "--seed", "0"]
    if mode in ("loop", "loop1"):
        script = ('out="$1"; shift; for f in "$@"; do id=$(basename "$f" .nii.gz); '
                  'meddiffseg segment "$f" --modality CT --out "$out/$id" --quiet ' + " ".join(common) +
                  ' || exit 1; done')
        return ["bash", "-c", script, mode, str(out), *(str(p) for _, p in studies)]
    batch = ["meddiffseg", "batch", str(csv_path), "--out", str(out), "--quiet", *common]
    if mode == "inproc":
        return batch + ["--no-ray"]
    if mode == "ray1":
        return batch + ["--workers", "1"]
    if mode == "ray2":
        return batch + ["--workers", "2"]
    raise ValueError(mode)


def per_study_seconds(out: Path, mode: str) -> list[float]:
    if mode in ("loop", "loop1"):
        return [json.loads(p.read_text())["timings_s"]["total"] for p in sorted(out.glob("*/summary.json"))]
    with open(out / "batch.csv", newline="", encoding="utf-8") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh) if r["status"] == "ok"]


def stage_medians(out: Path) -> dict[str, float]:
    """Median seconds per stage over the studies' summary.json (read, load_model, ..., write, total)."""
    timings = [json.loads(p.read_text())["timings_s"] for p in sorted(out.glob("*/summary.json"))]
    return {k: round(statistics.median(t[k] for t in timings), 2) for k in timings[0]} if timings else {}


def labels(folder: Path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "segmentation.nii.gz")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--organ", default="liver")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--model", default="abdomen-ct")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the outputs in this folder (default: a temporary one, removed)")
    args = ap.parse_args()

    images = sorted((data_root() / "btcv" / "imagesTr").glob("btcv_*.nii.gz"))[: args.cases]
    if len(images) < args.cases:
        print(f"need {args.cases} BTCV CTs under {data_root()}/btcv/imagesTr, found {len(images)}", file=sys.stderr)
        return 2
    studies = [(p.name[: -len(".nii.gz")], p) for p in images]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "studies.csv"
    csv_path.write_text("".join(f"{sid},{p},CT\n" for sid, p in studies), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    hw = hardware()
    print(json.dumps({"hardware": hw, "studies": [sid for sid, _ in studies], "organ": args.organ,
                      "samples": args.samples, "model": args.model, "load_before": load()}))
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    runs = []
    try:
        for rep in range(args.repeats):
            for mode in args.modes:
                out = work / f"{mode}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = command(mode, studies, csv_path, out, args)
                before = load()
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"} if mode == "loop1" else env,
                                      capture_output=True, text=True)
                wall = time.perf_counter() - t0
                run = {"mode": mode, "repeat": rep, "returncode": proc.returncode, "wall_s": round(wall, 2),
                       "studies_per_hour": round(len(studies) / wall * 3600, 1), "load_before": before,
                       "load_after": load(),
                       "command": cmd if not mode.startswith("loop") else f"bash loop of meddiffseg segment ({mode})"}
                if proc.returncode != 0:
                    run["stderr"] = proc.stderr[-2000:]
                else:
                    secs = per_study_seconds(out, mode)
                    run["study_s_median"] = round(statistics.median(secs), 2)
                    run["study_s_sum"] = round(sum(secs), 2)
                    run["stages_s_median"] = stage_medians(out)
                    ref_mode = SAME_THREADS.get(mode)
                    reference = work / f"{ref_mode}-{rep}"
                    if ref_mode and reference.is_dir():
                        run["compared_with"] = ref_mode
                        run["voxels_differing"] = int(sum(
                            (labels(out / sid) != labels(reference / sid)).sum() for sid, _ in studies))
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nhardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB; uptime before: {uptime_before}; "
          f"after: {uptime_after}")
    print(f"{len(studies)} BTCV CTs, {args.organ}, {args.samples} sample(s), {args.model}")
    print("| mode | wall s (runs) | studies/hour | median study s | × loop | voxels differing (vs) |")
    print("| --- | --- | --- | --- | --- | --- |")
    loop_rate = None
    summary = {}
    for mode in args.modes:
        ok = [r for r in runs if r["mode"] == mode and r["returncode"] == 0]
        if not ok:
            print(f"| {mode} | failed | | | | |")
            continue
        wall = statistics.median(r["wall_s"] for r in ok)
        rate = len(studies) / wall * 3600
        loop_rate = rate if mode == "loop" else loop_rate  # the ratios are against the plain loop
        ratio = f"{rate / loop_rate:.2f}" if loop_rate else ""
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in ok)
        study = statistics.median(r["study_s_median"] for r in ok)
        diff = ", ".join(f"{r['voxels_differing']} ({r['compared_with']})" for r in ok if "voxels_differing" in r)
        print(f"| {mode} | {wall:.1f} ({walls}) | {rate:.0f} | {study:.2f} | {ratio} | {diff} |")
        summary[mode] = {"wall_s_median": round(wall, 2), "studies_per_hour": round(rate, 1)}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"hardware": hw, "uptime_before": uptime_before,
                                             "uptime_after": uptime_after, "runs": runs, "summary": summary,
                                             "studies": [sid for sid, _ in studies]}, indent=2))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
