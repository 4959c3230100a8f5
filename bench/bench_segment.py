#!/usr/bin/env python
"""Benchmark ``meddiffseg segment`` on a CT-sized volume (not a test; see bench/README.md).

The volume is the real example CT (``$MEDDIFFSEG_DATA/totalsegmentator/example_ct.nii.gz``)
resampled onto a 512×512×200 grid at 0.8×0.8×2.5 mm (by default), centred on the scan, so
the content is realistic anatomy at clinical matrix size. Each ``--samples`` value runs in a
fresh subprocess so peak RSS and peak GPU memory are per run. One JSON object per run is
printed (and collected into ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA", REPO.parent / "shared" / "data")).resolve()


def make_volume(out_path: Path, shape=(512, 512, 200), spacing=(0.8, 0.8, 2.5), source: Path | None = None,
                cover_source_z: bool = False) -> dict:
    """Resample a CT (the example CT unless ``source``) onto a grid of ``shape`` (i, j, k) voxels at
    ``spacing`` mm around the same centre; outside the source the grid holds air (-1024 HU), or the
    source's minimum where that is higher (the clip floor of a windowed CT such as BTCV's). ``cover_source_z``: the k spacing is
    instead the source's own extent along k over ``shape[2]``, so every slice count shows the same
    anatomy (no padded air slices)."""
    import numpy as np
    import SimpleITK as sitk

    src_path = Path(source) if source else data_root() / "totalsegmentator" / "example_ct.nii.gz"
    if not src_path.is_file():
        raise SystemExit(f"bench: {src_path} not found (set MEDDIFFSEG_DATA to the data root)")
    src = sitk.ReadImage(str(src_path))
    spacing = [float(s) for s in spacing]
    if cover_source_z:
        spacing[2] = src.GetSize()[2] * src.GetSpacing()[2] / shape[2]
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(src)
    direction = np.array(src.GetDirection()).reshape(3, 3)
    centre_index = [(n - 1) / 2.0 for n in src.GetSize()]
    centre = np.array(src.TransformContinuousIndexToPhysicalPoint(centre_index))
    half_extent = (np.array(shape, dtype=float) - 1) / 2.0 * np.array(spacing)
    origin = centre - direction @ half_extent
    ref = sitk.Image([int(s) for s in shape], sitk.sitkInt16)
    ref.SetSpacing(spacing)
    ref.SetDirection(src.GetDirection())
    ref.SetOrigin([float(v) for v in origin])
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, max(-1024.0, stats.GetMinimum()), sitk.sitkInt16)
    sitk.WriteImage(out, str(out_path), useCompression=True)
    return {"source": src_path.name, "size": list(out.GetSize()), "spacing_mm": [round(s, 3) for s in out.GetSpacing()],
            "file_mb": round(out_path.stat().st_size / 2**20, 1)}


def worker(args) -> None:
    """One run in this (fresh) process; prints one JSON line."""
    import torch

    from MedDiffSegLib.inference.device import device_description, resolve_device
    from MedDiffSegLib.inference.pipeline import run_segment

    dev = resolve_device(args.device)
    out_dir = Path(tempfile.mkdtemp(prefix="meddiffseg-bench-out-"))
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        summary = run_segment(args.volume, out_dir / "out", list(args.organ), model=args.model, modality="CT",
                              samples=args.samples, steps=args.steps, seed=0, device=str(dev), staple=args.staple,
                              save_probabilities=args.save_probabilities)
        wall = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak_gpu = torch.cuda.max_memory_allocated(dev)
        else:
            peak_gpu = None
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if sys.platform == "darwin":
        rss_kib //= 1024
    organ = summary["organs"][0]
    print(json.dumps({
        "organs": len(summary["organs"]),
        "staple": summary["settings"]["staple"],
        "save_probabilities": bool(args.save_probabilities),
        "staple_per_organ": summary.get("staple"),
        "samples": summary["settings"]["samples"],
        "steps": summary["settings"]["steps"],
        "scheduler": summary["settings"]["scheduler"],
        "organ": organ["name"],
        "organ_volume_ml": round(organ["volume_ml"], 1),
        "seconds": summary["timings_s"],
        "wall_seconds": round(wall, 3),
        "peak_rss_mb": round(rss_kib / 1024, 1),
        "peak_gpu_mb": None if peak_gpu is None else round(peak_gpu / 2**20, 1),
        "device": device_description(dev),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"{summary['model']['name']} {summary['model']['version']}",
        "input_size": summary["input"]["size"],
        "input_spacing_mm": summary["input"]["spacing_mm"],
    }))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="installed model name or package folder (default: the default model)")
    p.add_argument("--organ", nargs="+", default=["liver"], help="organ(s) to segment (default: liver)")
    p.add_argument("--staple", action="store_true", help="fuse the samples with STAPLE")
    p.add_argument("--save-probabilities", action="store_true", help="also write every organ's probability map")
    p.add_argument("--samples", type=int, nargs="+", default=[1, 10], help="sample counts to run (default: 1 10)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], metavar=("I", "J", "K"),
                   help="bench volume size in voxels (default: 512 512 200)")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], metavar=("SI", "SJ", "SK"),
                   help="bench volume spacing in mm (default: 0.8 0.8 2.5)")
    p.add_argument("--volume", type=Path, help="use this volume instead of building one")
    p.add_argument("--json-out", type=Path, help="also write all results to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.samples = args.samples[0]
        worker(args)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="meddiffseg-bench-"))
    try:
        if args.volume is None:
            volume = tmp / "bench_ct.nii.gz"
            t0 = time.perf_counter()
            vol_info = make_volume(volume, tuple(args.shape), tuple(args.spacing))
            vol_info["build_seconds"] = round(time.perf_counter() - t0, 2)
        else:
            volume = args.volume
            vol_info = {"source": volume.name}
        print(json.dumps({"volume": vol_info}), flush=True)
        results = []
        for n in args.samples:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--volume", str(volume),
                   "--organ", *args.organ, "--samples", str(n), "--device", args.device]
            cmd += ["--staple"] if args.staple else []
            cmd += ["--save-probabilities"] if args.save_probabilities else []
            if args.model is not None:
                cmd += ["--model", str(args.model)]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.stderr.write(run.stderr)
                print(json.dumps({"samples": n, "error": (run.stderr.strip().splitlines() or ["?"])[-1],
                                  "returncode": run.returncode}), flush=True)
                results.append({"samples": n, "error": run.stderr.strip()[-2000:]})
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            results.append(result)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps({"volume": vol_info, "runs": results}, indent=2) + "\n", encoding="utf-8")
        return 0 if all("error" not in r for r in results) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
