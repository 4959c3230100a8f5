"""``python -m MedDiffSegLib.training --config FILE --out DIR [--data-root DIR]``."""

import argparse
import sys

from .trainer import TrainConfig, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m MedDiffSegLib.training", description=__doc__)
    ap.add_argument("--config", required=True, help="training config JSON (see MedDiffSegLib/training/configs/)")
    ap.add_argument("--out", required=True, help="output folder (log, history, and the model package)")
    ap.add_argument("--data-root", default=None, help="root for relative data paths (default $MEDDIFFSEG_DATA or ../shared/data)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count (quick trials)")
    args = ap.parse_args(argv)
    cfg = TrainConfig.from_file(args.config)
    if args.steps_scale != 1.0:
        for s in cfg.stages.values():
            s["steps"] = max(1, int(round(s["steps"] * args.steps_scale)))
    train(cfg, args.out, data_root=args.data_root, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
