#!/usr/bin/env python
"""A model package from a training run's checkpoint, while (or after) the run trains.

    python bench/package_checkpoint.py RUN_DIR CONFIG OUT_DIR [--checkpoint NAME] [--version V]

Takes the newest checkpoint of ``RUN_DIR`` (or ``--checkpoint step-S-NNNNNNN``), checks it was
written for ``CONFIG`` (the same config digest the trainer checks on ``--resume``), and writes
``OUT_DIR/<name>/``: the model's weights (safetensors, nothing unpickled) with the config's organs,
preprocessing and inference settings; the version is the config's with ``+step<N>`` unless
``--version`` is given. The provenance records the run, the checkpoint, its stage and step, the
training time so far and the config. Uses: try a model while it trains, and start a second phase of
training from a checkpoint with another recipe (a config's ``init_from`` takes a package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def package_checkpoint(run_dir: Path, config: Path, out_dir: Path, checkpoint: str | None = None,
                       version: str | None = None):
    from MedDiffSegLib.errors import MedDiffSegError
    from MedDiffSegLib.methods.base import build_method
    from MedDiffSegLib.preprocessing import PreprocessSpec
    from MedDiffSegLib.registry.package import save_package, sha256_file
    from MedDiffSegLib.training import TrainConfig
    from MedDiffSegLib.training.checkpoint import latest_checkpoint, load_checkpoint
    from MedDiffSegLib.training.organs import organ_from_config
    from MedDiffSegLib.training.trainer import config_digest, method_config_for, package_inference

    cfg = TrainConfig.from_file(config)
    path = (run_dir / "checkpoints" / checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None or not path.is_dir():
        raise MedDiffSegError(f"no checkpoint {'named ' + checkpoint + ' ' if checkpoint else ''}in {run_dir}")
    tensors, meta = load_checkpoint(path)
    if meta.get("config_digest") != config_digest(cfg):
        raise MedDiffSegError(f"{path} was written for another configuration than {config}")
    organs = [organ_from_config(o) for o in cfg.organs]
    method = build_method(cfg.method, method_config_for(cfg, len(organs)))
    method.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    method.eval()
    stage, step = meta["stage"], int(meta["step"])
    provenance = {"from_checkpoint": {"run": str(run_dir.resolve()), "checkpoint": path.name, "stage": stage,
                                      "step": step, "elapsed_s": round(float(meta.get("elapsed_s", 0.0)), 1),
                                      "state_sha256": sha256_file(path / "state.safetensors"),
                                      "resumed_at": meta.get("resumed_at", [])},
                  "config": cfg.to_dict(), "parameters": sum(p.numel() for p in method.parameters())}
    return save_package(out_dir / cfg.name, method, name=cfg.name, version=version or f"{cfg.version}+step{step}",
                        organs=organs, preprocessing=PreprocessSpec.from_dict(cfg.preprocessing), inference=package_inference(cfg),
                        description=f"{cfg.description} (checkpoint {path.name} of an unfinished run: {stage} step {step})",
                        provenance=provenance, metrics={})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("config", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--checkpoint", help="a checkpoint folder's name (default: the newest)")
    ap.add_argument("--version", help="the package's version (default: the config's +step<N>)")
    args = ap.parse_args(argv)
    pkg = package_checkpoint(args.run_dir, args.config, args.out_dir, args.checkpoint, args.version)
    print(f"{pkg.path} ({pkg.name} {pkg.version}, {pkg.provenance['from_checkpoint']['checkpoint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
