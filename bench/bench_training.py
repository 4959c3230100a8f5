#!/usr/bin/env python
"""Training throughput of a config, and where a step's time goes.

    OMP_NUM_THREADS=1 python bench/bench_training.py MedDiffSegLib/training/configs/abdomen-ct.json \
        [--steps 30] [--stage denoiser] [--threads N] [--amp bf16] [--method M]

Loads the config's training data as ``meddiffseg train`` does, then times ``--steps`` steps of
one stage, split into: drawing windows (sampler, incl. context slices and organ shifts),
augmentation (MONAI transforms), forward + loss, backward, optimizer step. Prints one JSON
document: seconds per step for each part (median over the steps after a warm-up step),
windows per second, the batch size, threads and CPU. ``--amp bf16`` times it under bf16 autocast
(``meddiffseg train --amp bf16``); ``--method`` times another method on the same config (its
default network). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stage", help="stage to time (default: the method's last)")
    ap.add_argument("--threads", type=int, help="torch threads (default: as set by OMP_NUM_THREADS)")
    ap.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast mode (default: off)")
    ap.add_argument("--method", help="time this method instead of the config's (its default network)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from MedDiffSegLib.inference.device import device_description
    from MedDiffSegLib.methods.base import build_method
    from MedDiffSegLib.preprocessing import PreprocessSpec
    from MedDiffSegLib.training.augment import augment_batch, augmentation_settings
    from MedDiffSegLib.training.data import SliceWindowSampler
    from MedDiffSegLib.networks import DOWNSAMPLE
    from MedDiffSegLib.training.interactive import error_weights, interactive_settings, simulate_prompts
    from MedDiffSegLib.training.organs import organ_from_config
    from MedDiffSegLib.training.trainer import TrainConfig, apply_overrides, load_split, method_config_for

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_overrides(TrainConfig.from_file(args.config), method=args.method)
    root = Path(os.environ.get("MEDDIFFSEG_DATA") or REPO.parent / "shared" / "data")
    names = [organ_from_config(o).name for o in cfg.organs]
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    method = build_method(cfg.method, method_config_for(cfg, len(names)))
    stage = args.stage or method.stages[-1]
    t0 = time.perf_counter()
    split = load_split(cfg.train, cfg, names, spec, root)
    load_s = time.perf_counter() - t0
    aug = augmentation_settings(cfg.augmentation)
    interactive = interactive_settings(cfg.interactive)
    soft = bool(cfg.soft_targets)
    shift = aug["organ_shift"]
    if aug["organ_shift_hu"] is not None:
        lo, hi = spec.ct_window
        shift = [v * 2.0 / (hi - lo) for v in aug["organ_shift_hu"]]
    roi = int(cfg.inference.get("roi_size", [224, 224])[0])
    sampler = SliceWindowSampler(split.volumes, len(names), roi, cfg.foreground_fraction, seed=0, groups=split.groups,
                                 context_slices=spec.context_slices, organ_shift=shift,
                                 organ_shift_prob=float(aug["organ_shift_prob"]))
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(2)
    batch = int(cfg.stages.get(stage, {}).get("batch", 8))
    params = method.stage_parameters(stage)
    for p in method.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    method.train()
    names_t = ("draw", "augment", "prompts", "forward", "backward", "optimizer")
    parts: dict[str, list[float]] = {k: [] for k in (*names_t, "step")}
    for i in range(args.steps + 1):
        t = [time.perf_counter()]
        x, y, ids = sampler.batch(batch)
        t.append(time.perf_counter())
        x, y = augment_batch(x, y, rng, aug, soft=soft)
        t.append(time.perf_counter())
        prompts = None  # the clicks simulated from the model's own errors, as the trainer does
        if interactive is not None and stage == method.stages[-1]:
            prompts = simulate_prompts(method, x, y, ids, rng, gen, interactive, spec.spacing)
        t.append(time.perf_counter())
        extra = {} if prompts is None else {"prompts": prompts}
        if prompts is not None and float(interactive["error_weight"]) > 0:  # as the trainer weighs the loss
            extra["weights"] = error_weights(prompts, y, float(interactive["error_weight"]), DOWNSAMPLE)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = method.training_loss(x, y, ids, gen, stage=stage, **extra)["loss"]
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t.append(time.perf_counter())
        if i == 0:
            continue  # warm-up
        for k, a, b in zip(names_t, t, t[1:]):
            parts[k].append(b - a)
        parts["step"].append(t[-1] - t[0])
    med = {k: round(statistics.median(v), 4) for k, v in parts.items()}
    out = {"config": str(args.config), "method": cfg.method, "amp": args.amp, "stage": stage, "batch": batch, "roi": roi,
           "context_slices": spec.context_slices, "steps_timed": args.steps,
           "seconds_per_step_median": med,
           "share": {k: round(v / med["step"], 3) for k, v in med.items() if k != "step"},
           "windows_per_second": round(batch / med["step"], 2),
           "data_load_s": round(load_s, 1), "volumes": len(split.volumes),
           "threads": torch.get_num_threads(), "cpu": device_description(torch.device("cpu")),
           "machine": platform.machine(), "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
