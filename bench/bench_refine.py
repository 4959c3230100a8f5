#!/usr/bin/env python
"""Benchmark one click of interactive correction on a 512×512×200 CT (not a test; see bench/README.md).

The target (issue #22): one click's update ≤ 2 s on the project's 2-core CPU, in a session that
stays alive between clicks (:class:`~MedDiffSegLib.interactive.session.InteractiveSession`).
The volume is a real whole-abdomen CT (BTCV 0040 by default) resampled to 512×512×200 at
0.8×0.8×2.5 mm (``bench_segment.make_volume``). The model is a package (``--model``) or, by
default, the real architecture of ``abdomen-ct-2.json`` with random weights: the time of a click
does not depend on the weights, only on the slices a click reaches (the model's click radius)
and the network. The starting label map is the BTCV ground truth resampled alike, so the organs
are where a real result would have them.

It times, in one process: opening the session (model load, reading, preprocessing), the first
click (slices encoded for the first time), a second click nearby (encodings from the cache), a
click on other slices, and a box; then three suggestions of where to click next for the organ and for
the liver (the largest organ: the slowest). With ``--probabilities`` the session also keeps each
organ's probability map (the mask smoothed by 2 mm stands in for it; each click re-samples it) and
the suggestions are timed from it as well. Prints one JSON object with the hardware.

    python bench/bench_refine.py [--model PKG] [--organ pancreas] [--samples 1] [--device cpu] [--probabilities]
        [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_segment import data_root, make_volume  # noqa: E402


def random_package(folder: Path):
    """The abdomen-ct-2 architecture with random weights (prompt encoder acting), as a package."""
    import torch

    from MedDiffSegLib.methods.base import build_method
    from MedDiffSegLib.preprocessing import PreprocessSpec
    from MedDiffSegLib.registry import save_package
    from MedDiffSegLib.training.organs import organ_from_config
    from MedDiffSegLib.training.trainer import TrainConfig, method_config_for

    cfg = TrainConfig.from_file(REPO / "MedDiffSegLib" / "training" / "configs" / "abdomen-ct-2.json")
    torch.manual_seed(0)
    method = build_method(cfg.method, method_config_for(cfg, len(cfg.organs)))
    torch.nn.init.normal_(method.prompt_encoder.head.weight, std=0.02)
    inference = dict(cfg.inference, click_radius_mm=float(cfg.interactive["click_radius_mm"]))
    return save_package(folder, method, name="bench-random", version="0", organs=[organ_from_config(o) for o in cfg.organs],
                        preprocessing=PreprocessSpec.from_dict(cfg.preprocessing), inference=inference,
                        description="random weights, for timing only")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a package folder or installed name (default: random abdomen-ct-2 architecture)")
    ap.add_argument("--case", default="btcv_0040", help="BTCV case whose CT and labels are resampled")
    ap.add_argument("--organ", default="pancreas")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--probabilities", action="store_true",
                    help="give the session probability maps (a result saved with --save-probabilities): each click "
                         "also re-samples the organ's map, and the suggestions are timed from it too")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk
    import torch

    from MedDiffSegLib.interactive.session import InteractiveSession
    from MedDiffSegLib.registry import ModelPackage, resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-refine-"))
    src = data_root() / "btcv" / "imagesTr" / f"{args.case}.nii.gz"
    vol_info = make_volume(tmp / "ct.nii.gz", source=src, cover_source_z=True)
    t0 = time.perf_counter()
    image = sitk.ReadImage(str(tmp / "ct.nii.gz"))
    gt = sitk.ReadImage(str(data_root() / "btcv" / "labelsTr" / f"{args.case}.nii.gz"))
    gt.SetOrigin(sitk.ReadImage(str(src)).GetOrigin())
    gt.SetDirection(sitk.ReadImage(str(src)).GetDirection())
    labels_all = sitk.Resample(gt, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    package = (ModelPackage.from_folder(args.model) if args.model and Path(args.model).is_dir()
               else resolve_model(args.model) if args.model else random_package(tmp / "pkg"))
    table = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
             "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_vein_and_splenic_vein": 10, "pancreas": 11,
             "adrenal_gland_right": 12, "adrenal_gland_left": 13}
    organs = [o for o in ("liver", "spleen", "pancreas", "kidney_right", "kidney_left") if o in package.organ_names]
    lab = sitk.GetArrayFromImage(labels_all)
    mine = np.zeros(lab.shape, np.uint8)
    for i, o in enumerate(organs, start=1):
        mine[lab == table[o]] = i
    labels = sitk.GetImageFromArray(mine)
    labels.CopyInformation(image)
    # with --probabilities, each organ's probability map (what a result saved with --save-probabilities carries):
    # its mask smoothed by 2 mm, so that the band around the boundary holds probabilities between 0 and 1
    probabilities = {}
    for i, o in enumerate(organs if args.probabilities else [], start=1):
        m = sitk.GetImageFromArray((mine == i).astype(np.float32))
        m.CopyInformation(image)
        probabilities[o] = sitk.SmoothingRecursiveGaussian(m, 2.0)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = InteractiveSession(image, package, organs, labels, device=args.device, samples=args.samples,
                                 probabilities=probabilities)
    del probabilities
    t_open = time.perf_counter() - t0
    # clicks: the organ's centre, a point 10 mm from it, and a point 60 mm further along z
    zyx = np.argwhere(mine == organs.index(args.organ) + 1)
    c = zyx.mean(axis=0)
    centre = image.TransformContinuousIndexToPhysicalPoint((float(c[2]), float(c[1]), float(c[0])))
    near = (centre[0] + 10.0, centre[1], centre[2])
    far = (centre[0], centre[1], centre[2] + 60.0 * (1 if c[0] < mine.shape[0] / 2 else -1))
    box = (centre[0] - 30, centre[1] - 20, centre[2] - 10, centre[0] + 30, centre[1] + 20, centre[2] + 10)
    timings = []
    for what, kw in (("first click (slices encoded)", {"positive": [centre]}),
                     ("second click nearby (cached)", {"negative": [near]}),
                     ("click 60 mm away (new slices)", {"positive": [far]}),
                     ("box", {"box": box})):
        t0 = time.perf_counter()
        inter = session.refine(args.organ, **kw)
        timings.append({"interaction": what, "seconds": round(time.perf_counter() - t0, 3),
                        "slices": len(inter.slices), "changed_voxels": inter.changed_voxels})
    # where to click next, refreshed after every correction (its cost is the organ's box: distance map and
    # smoothing; it does not depend on the uncertainty's values)
    suggestions = []
    for organ in dict.fromkeys([args.organ, "liver"]):
        if organ in organs:
            for source, use_probability in (("variance", False), ("probability", True))[:1 + args.probabilities]:
                t0 = time.perf_counter()
                found = session.suggest(organ, 3, use_probability=use_probability)
                suggestions.append({"organ": organ, "from": source, "seconds": round(time.perf_counter() - t0, 3),
                                    "found": len(found),
                                    "organ_ml": round(float((session.labels_c == organs.index(organ) + 1).sum())
                                                      * float(np.prod(session.spacing_kji)) / 1000.0, 1)})
    result = {
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "device": args.device},
        "volume": vol_info, "model": package.name, "click_radius_mm": session.radius_mm, "organ": args.organ,
        "samples": args.samples, "probabilities": bool(args.probabilities), "read_s": round(t_read, 2), "open_session_s": round(t_open, 2),
        "interactions": timings, "suggestions": suggestions,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
