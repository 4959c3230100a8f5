"""Staged training of a Method from a JSON config, ending in an installable model package.

Config (JSON)::

    {"name": "abdomen-ct-guided", "version": "0.1.0", "method": "guided",
     "method_config": {...} | null,          # null: the method's default_config(num_organs)
     "organs": [{"name": ..., "display_name": ..., "color": [...], "category": {...}, "type": {...}}],
     "preprocessing": {...}, "inference": {...},
     "name_tables": {"ts_ct": {"liver": 5, ...}},
     "train": [{"image": "rel/or/abs", "label": "...", "table": "ts_ct", "slices": [0, 90]}],
     "validation": [...same...],
     "stages": {"autoencoder": {"steps": 1500, "lr": 0.002, "batch": 16},
                "denoiser": {"steps": 4000, "lr": 0.0005, "batch": 8}},
     "weight_decay": 0.0001, "seed": 0, "val_every": 500, "foreground_fraction": 0.67}

Relative data paths are resolved against the data root (``$MEDDIFFSEG_DATA`` or the
``data_root`` argument). Each stage uses AdamW with a cosine schedule and trains only the
stage's parameters.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import MedDiffSegError
from ..methods.base import _METHODS, _import_builtin_methods, build_method
from ..preprocessing import PreprocessSpec
from ..registry import ModelPackage, Organ, save_package
from .augment import augment_batch
from .data import SliceWindowSampler, load_labelled_volume


@dataclass
class TrainConfig:
    name: str
    version: str
    method: str
    organs: list[dict]
    preprocessing: dict
    name_tables: dict[str, dict[str, int]]
    train: list[dict]
    validation: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    method_config: dict | None = None
    inference: dict = field(default_factory=dict)
    weight_decay: float = 1e-4
    seed: int = 0
    val_every: int = 500
    foreground_fraction: float = 0.67
    description: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedDiffSegError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**d)


def _resolve(p: str, root: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


def _load_split(entries: list[dict], cfg: TrainConfig, organs: list[str], spec: PreprocessSpec, root: Path):
    vols = []
    for e in entries:
        vols.append(load_labelled_volume(
            _resolve(e["image"], root), _resolve(e["label"], root), cfg.name_tables[e["table"]],
            organs, spec, tuple(e["slices"]) if e.get("slices") else None, name=e.get("name", e["image"]),
        ))
    return vols


@torch.no_grad()
def validate(method, volumes, num_organs: int, roi: int, generator_seed: int = 1234) -> dict[str, float]:
    """Per-organ Dice over all validation slices (single-step, 1 sample, windows padded to ``roi``)."""
    method.eval()
    inter = np.zeros(num_organs)
    total = np.zeros(num_organs)
    g = torch.Generator().manual_seed(generator_seed)
    for vol in volumes:
        S, H, W = vol.images.shape
        m = int(getattr(method, "size_multiple", 8))
        Hp, Wp = max(roi, math.ceil(H / m) * m), max(roi, math.ceil(W / m) * m)
        img = torch.full((S, 1, Hp, Wp), -1.0)
        img[:, 0, :H, :W] = vol.images
        for s0 in range(0, S, 8):
            x = img[s0:s0 + 8]
            cond = method.condition(x)
            b = x.shape[0]
            cond = method.expand_condition(cond, num_organs)
            ids = torch.arange(num_organs).repeat(b)
            p = method.sample(cond, ids, 1, 1, g)[:, 0, :H, :W].reshape(b, num_organs, H, W)
            pred = p >= 0.5
            gt = torch.stack([vol.labels[s0:s0 + 8] == o + 1 for o in range(num_organs)], 1)
            keep = torch.from_numpy(vol.labelled)
            inter += ((pred & gt).flatten(2).sum(-1).sum(0) * keep).numpy()
            total += ((pred.flatten(2).sum(-1) + gt.flatten(2).sum(-1)).sum(0) * keep).numpy()
    method.train()
    return {str(o): (float(2 * inter[o] / total[o]) if total[o] > 0 else float("nan")) for o in range(num_organs)}


def train(cfg: TrainConfig, out_dir: str | Path, *, data_root: str | Path | None = None,
          log: Callable[[str], None] = print) -> ModelPackage:
    root = Path(data_root or os.environ.get("MEDDIFFSEG_DATA", "../shared/data")).resolve()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    _import_builtin_methods()
    organs = [Organ.from_dict(o) for o in cfg.organs]
    names = [o.name for o in organs]
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    mcfg = cfg.method_config or _METHODS[cfg.method].default_config(len(organs))
    method = build_method(cfg.method, mcfg)
    roi = int(cfg.inference.get("roi_size", [224, 224])[0])
    n_params = sum(p.numel() for p in method.parameters())
    log(f"method {cfg.method}: {n_params / 1e6:.2f} M parameters; organs {names}")

    t0 = time.time()
    train_vols = _load_split(cfg.train, cfg, names, spec, root)
    val_vols = _load_split(cfg.validation, cfg, names, spec, root)
    log(f"data: {[tuple(v.images.shape) for v in train_vols]} train, {[tuple(v.images.shape) for v in val_vols]} val "
        f"({time.time() - t0:.1f} s)")
    sampler = SliceWindowSampler(train_vols, len(organs), roi, cfg.foreground_fraction, seed=cfg.seed)
    aug_rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.csv"
    history: dict[str, Any] = {"stages": {}}
    started = time.time()
    with open(log_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stage", "step", "loss", "terms", "lr", "seconds"])
        for stage in method.stages:
            scfg = cfg.stages.get(stage, {})
            steps, lr, bs = int(scfg.get("steps", 1000)), float(scfg.get("lr", 1e-3)), int(scfg.get("batch", 8))
            if steps <= 0:
                continue
            params = method.stage_parameters(stage)
            for p in method.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
            warm = max(1, steps // 50)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
            method.train()
            ts = time.time()
            running = None
            for step in range(1, steps + 1):
                x, y, ids = sampler.batch(bs)
                x, y = augment_batch(x, y, aug_rng)
                losses = method.training_loss(x, y, ids, generator=gen, stage=stage)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                lv = float(losses["loss"])
                running = lv if running is None else 0.98 * running + 0.02 * lv
                if step % 25 == 0 or step == steps:
                    terms = {k: round(float(v), 5) for k, v in losses.items() if k != "loss"}
                    writer.writerow([stage, step, f"{lv:.5f}", json.dumps(terms), f"{sched.get_last_lr()[0]:.2e}",
                                     f"{time.time() - ts:.1f}"])
                    fh.flush()
                if step % 100 == 0 or step == steps:
                    log(f"[{stage}] step {step}/{steps} loss {running:.4f} ({time.time() - ts:.0f} s)")
                if stage == method.stages[-1] and val_vols and (step % cfg.val_every == 0 or step == steps):
                    dice = validate(method, val_vols, len(organs), roi)
                    log(f"[{stage}] step {step} validation Dice " +
                        ", ".join(f"{names[int(k)]} {v:.3f}" for k, v in dice.items()))
                    history.setdefault("validation", []).append({"stage": stage, "step": step, "dice": {names[int(k)]: v for k, v in dice.items()}})
            history["stages"][stage] = {"steps": steps, "lr": lr, "batch": bs, "seconds": round(time.time() - ts, 1)}
    for p in method.parameters():
        p.requires_grad_(True)
    method.eval()
    wall = time.time() - started
    provenance = {
        "trained": True,
        "config": cfg.__dict__,
        "stages": history["stages"],
        "wall_time_s": round(wall, 1),
        "hardware": {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "parameters": n_params,
    }
    metrics = {"validation_dice_last": history.get("validation", [{}])[-1].get("dice", {})} if history.get("validation") else {}
    pkg_dir = out_dir / cfg.name
    pkg = save_package(pkg_dir, method, name=cfg.name, version=cfg.version, organs=organs, preprocessing=spec,
                       inference=cfg.inference, description=cfg.description, provenance=provenance, metrics=metrics)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    log(f"wrote {pkg_dir} ({wall / 60:.1f} min)")
    return pkg
