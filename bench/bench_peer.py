#!/usr/bin/env python
"""Side by side: ``meddiffseg segment`` against a TotalSegmentator-fast-like MONAI DynUNet pass.

    python bench/bench_peer.py [--repeats 3] [--samples 1 10] [--slices 200] [--scaling 100 200 400]
        [--organ liver [spleen ...]] [--device cpu|cuda] [--meddiffseg-args '--no-adaptive ...']
        [--source CT | --volume CT] [--json-out FILE]

Every run is a fresh process timed from spawn to exit (Python start-up, imports, model load,
read, compute, write: what a user waits for), with its own peak RSS (``os.wait4``). Runs
alternate (meddiffseg 1 sample, meddiffseg 10 samples, peer, then again) so that drift of a shared
machine hits all of them alike; medians and spread (min-max) are printed with the ratios.

The peer is the topology TotalSegmentator's ``--fast`` model runs (nnU-Net 3d_fullres at 3 mm):
a MONAI ``DynUNet`` with filters 32-64-128-256-320-320, 3³ kernels, strides 1,2,2,2,2,(1,1,2) (x, y, z:
112 → 7 in-plane, 128 → 4 along z),
118 output classes, random weights (the time does not depend on the values), instance norm,
sliding windows of 112×112×128 voxels with overlap 0.5 and Gaussian blending, batch 1; the input is
resampled to 3 mm (trilinear) and the label map back (nearest), read and written as NIfTI. The
volume: the example CT (or ``--source``) resampled to 512×512×K at 0.8×0.8×2.5 mm around its
centre (``bench_segment.make_volume``); ``--volume`` takes a CT as it is.

``--scaling`` also times meddiffseg (1 and the largest ``--samples``) on the same anatomy resampled
to those slice counts (512×512 at 0.8 mm; the k spacing is the source's extent over K, so no slice is
padding) and fits the cost model ``t = fixed + per_slice·K + per_pass·P`` by least squares, where P
is the number of network window passes the run reported (``summary.json`` ``sampling``: windows
inside the body × samples drawn there, per organ). With adaptive sampling and the skip of windows
outside the body, P depends on what the scan shows, not on K and N alone: the per-slice part is
reading, preprocessing, post-processing and writing; the per-pass part is the network.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "bench"))

PEER_CLASSES = 118
PEER_SPACING = 3.0
PEER_PATCH = (112, 112, 128)


def peer_worker(volume: str, out: str, device: str = "cpu") -> None:
    """The peer's whole job in this process: read, resample, sliding-window DynUNet, argmax, back, write."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = DynUNet(spatial_dims=3, in_channels=1, out_channels=PEER_CLASSES,
                  kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, [1, 1, 2]], upsample_kernel_size=[2, 2, 2, 2, [1, 1, 2]],
                  filters=[32, 64, 128, 256, 320, 320], norm_name="instance", res_block=False).eval().to(device)
    image = sitk.ReadImage(volume)
    arr = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))  # [z, y, x]
    sx, sy, sz = image.GetSpacing()
    size = [max(1, round(n * s / PEER_SPACING)) for n, s in zip(arr.shape, (sz, sy, sx))]
    x = F.interpolate(arr[None, None], size=size, mode="trilinear", align_corners=False)
    x = ((x.clamp(-1000, 1000) - 0.0) / 250.0).permute(0, 1, 4, 3, 2).to(device)  # [1, 1, x, y, z] as nnU-Net reads it
    with torch.inference_mode(), torch.autocast(device, enabled=device.startswith("cuda")):  # nnU-Net runs AMP on GPUs
        logits = sliding_window_inference(x, PEER_PATCH, 1, net, overlap=0.5, mode="gaussian")
        labels = logits.argmax(1, keepdim=True).to(torch.uint8)
        del logits
        labels = labels.permute(0, 1, 4, 3, 2).float()
        back = F.interpolate(labels, size=tuple(arr.shape), mode="nearest")[0, 0].to(torch.uint8).cpu().numpy()
    out_img = sitk.GetImageFromArray(back)
    out_img.CopyInformation(image)
    sitk.WriteImage(out_img, out, useCompression=True)


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall seconds from spawn to exit and the child's own peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {err.strip()[-800:]}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "stdout": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--scaling", type=int, nargs="*", default=[])
    ap.add_argument("--organ", nargs="+", default=["liver"],
                    help="organs meddiffseg segments (each is its own prompt; the peer labels all its classes in one pass)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-peer", action="store_true", help="time meddiffseg only")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both meddiffseg and the peer run there)")
    ap.add_argument("--meddiffseg-args", default="", metavar="ARGS",
                    help="extra 'meddiffseg segment' options for a lever's arm, e.g. '--no-adaptive --precision fp32'")
    ap.add_argument("--source", type=Path, help="resample this CT instead of the example CT (e.g. a whole-abdomen BTCV scan)")
    ap.add_argument("--volume", type=Path, help="time this CT as it is (--slices and --source are then ignored for the main runs)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--peer-worker", nargs=2, metavar=("VOLUME", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_worker:
        peer_worker(*args.peer_worker, device=args.device)
        return 0

    import torch

    from bench_segment import make_volume
    from MedDiffSegLib.inference.device import device_description

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    meddiffseg = shutil.which("meddiffseg") or "meddiffseg"
    tmp = Path(tempfile.mkdtemp(prefix="meddiffseg-peer-"))
    hardware = {"cpu": device_description(torch.device("cpu")), "cpu_count": os.cpu_count(),
                "gpu": device_description(torch.device(args.device)) if args.device.startswith("cuda") else None,
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
    print(json.dumps({"hardware": hardware}), flush=True)

    def ours(volume: Path, samples: int) -> dict:
        out = tmp / f"out-{samples}-{time.monotonic_ns()}"
        cmd = [meddiffseg, "segment", str(volume), *[f"--organ={o}" for o in args.organ], "--samples", str(samples),
               "--modality", "CT", "--out", str(out), "--device", args.device, *args.meddiffseg_args.split()]
        if args.model:
            cmd += ["--model", args.model]
        r = timed(cmd, env)
        summary = json.loads((out / "summary.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
        r["stages"] = summary["timings_s"]
        sampling = summary.get("sampling") or {}
        r["samples_per_window"] = {k: v["samples_per_window"] for k, v in (sampling.get("organs") or {}).items()}
        r["windows"] = sampling.get("windows")
        r["windows_outside_body"] = sampling.get("windows_outside_body")
        r["network_passes"] = sum(v["samples_drawn"] for v in (sampling.get("organs") or {}).values()) if sampling else None
        r["precision"] = summary["settings"].get("precision")
        r.pop("stdout")
        return r

    def peer(volume: Path) -> dict:
        out = tmp / "peer.nii.gz"
        r = timed([sys.executable, str(Path(__file__).resolve()), "--peer-worker", str(volume), str(out),
                   "--device", args.device], env)
        out.unlink(missing_ok=True)
        r.pop("stdout")
        return r

    try:
        if args.volume:
            import SimpleITK as sitk

            volume = args.volume
            head = sitk.ImageFileReader()
            head.SetFileName(str(volume))
            head.ReadImageInformation()
            info = {"source": volume.name, "size": list(head.GetSize()), "spacing_mm": list(head.GetSpacing())}
        else:
            volume = tmp / f"ct_{args.slices}.nii.gz"
            info = make_volume(volume, (512, 512, args.slices), (0.8, 0.8, 2.5), source=args.source)
        print(json.dumps({"volume": info}), flush=True)
        runs: dict[str, list[dict]] = {f"meddiffseg {n} sample(s)": [] for n in args.samples}
        if not args.no_peer:
            runs["peer DynUNet (TotalSegmentator fast topology)"] = []
        for rep in range(args.repeats):
            for n in args.samples:
                r = ours(volume, n)
                runs[f"meddiffseg {n} sample(s)"].append(r)
                print(json.dumps({"run": f"meddiffseg {n}", "repeat": rep, **r}), flush=True)
            if not args.no_peer:
                r = peer(volume)
                runs["peer DynUNet (TotalSegmentator fast topology)"].append(r)
                print(json.dumps({"run": "peer", "repeat": rep, **r}), flush=True)
        table = {}
        for name, rs in runs.items():
            secs = [r["seconds"] for r in rs]
            table[name] = {"median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "runs": len(rs)}
        peer_name = "peer DynUNet (TotalSegmentator fast topology)"
        if peer_name in table:
            for name, row in table.items():
                row["ratio_to_peer"] = row["median_s"] / table[peer_name]["median_s"]
        result = {"hardware": hardware, "device": args.device, "meddiffseg_args": args.meddiffseg_args, "organs": args.organ,
                  "volume": info, "table": table, "runs": runs}

        if args.scaling:
            top = max(args.samples)
            points = []
            for k in args.scaling:
                vol = tmp / f"ct_{k}.nii.gz"
                vinfo = make_volume(vol, (512, 512, k), (0.8, 0.8, 2.5), source=args.source, cover_source_z=True)
                for n in sorted({1, top}):
                    r = ours(vol, n)
                    points.append({"slices": k, "spacing_mm": vinfo["spacing_mm"], "samples": n, "seconds": r["seconds"],
                                   "peak_rss_mb": r["peak_rss_mb"], "network_passes": r["network_passes"],
                                   "windows_outside_body": r["windows_outside_body"], "stages": r["stages"]})
                    print(json.dumps({"scaling": points[-1]}), flush=True)
            result["scaling"] = points
            result["cost_model"] = fit_cost_model(points)
        print("\n" + markdown(result))
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fit_cost_model(points: list[dict]) -> dict:
    """Least squares ``t = fixed + per_slice·K + per_pass·P`` (P: network window passes the run reported)."""
    import numpy as np

    if any(p.get("network_passes") is None for p in points):
        raise SystemExit("bench: this meddiffseg does not report its network passes (summary.json 'sampling')")
    a = np.array([[1.0, p["slices"], p["network_passes"]] for p in points], dtype=float)
    t = np.array([p["seconds"] for p in points])
    coef, *_ = np.linalg.lstsq(a, t, rcond=None)
    return {"fixed_s": float(coef[0]), "per_slice_s": float(coef[1]), "per_pass_s": float(coef[2]),
            "max_abs_residual_s": float(np.max(np.abs(a @ coef - t)))}


def _targets(result: dict) -> str:
    """Issue 15's targets against this run: CPU as ratios to the peer and peak RSS, GPU in seconds."""
    rows = result["table"]
    one, ten = rows.get("meddiffseg 1 sample(s)"), rows.get("meddiffseg 10 sample(s)")
    if result.get("device", "cpu").startswith("cuda"):
        checks = [("1 sample ≤ 2 s", one, lambda r: r["median_s"] <= 2.0), ("10 samples ≤ 5 s", ten, lambda r: r["median_s"] <= 5.0)]
    else:
        checks = [("1 sample ≤ 0.2× peer", one, lambda r: r.get("ratio_to_peer", 9) <= 0.2),
                  ("10 samples ≤ 1.0× peer (aim 0.7×)", ten, lambda r: r.get("ratio_to_peer", 9) <= 1.0),
                  ("peak RSS ≤ 3 GB", ten or one, lambda r: r["peak_rss_mb"] * 2**20 <= 3e9)]
    return "Targets: " + "; ".join(f"{name}: {'met' if ok(r) else 'NOT met'}" for name, r, ok in checks if r is not None) + "."


def markdown(result: dict) -> str:
    h = result["hardware"]
    lines = [f"Hardware: {h['cpu']}, {h['cpu_count']} cores, torch {h['torch']} ({h['torch_threads']} threads), "
             f"Python {h['python']}. Volume: {result['volume']['size']} at {result['volume']['spacing_mm']} mm. "
             f"Organs: {', '.join(result.get('organs') or ['liver'])}.", "",
             "| run | median s | min–max s | peak RSS MB | × peer |", "| --- | --- | --- | --- | --- |"]
    for name, r in result["table"].items():
        ratio = f"{r['ratio_to_peer']:.2f}" if "ratio_to_peer" in r else "-"
        lines.append(f"| {name} | {r['median_s']:.1f} | {r['min_s']:.1f}–{r['max_s']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} |")
    lines += ["", _targets(result)]
    if "cost_model" in result:
        c = result["cost_model"]
        lines += ["", f"Cost model (least squares over {len(result['scaling'])} runs): t = {c['fixed_s']:.1f} s + "
                      f"{c['per_slice_s'] * 1000:.1f} ms × slices + {c['per_pass_s'] * 1000:.1f} ms × network window "
                      f"passes; largest residual {c['max_abs_residual_s']:.1f} s.", "",
                  "| slices | k spacing mm | samples | s | network passes | windows outside body | peak RSS MB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p['slices']} | {p['spacing_mm'][2]:.2f} | {p['samples']} | {p['seconds']:.1f} | {p['network_passes']} | "
                  f"{p['windows_outside_body']} | {p['peak_rss_mb']:.0f} |" for p in result["scaling"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
