"""``meddiffseg train``: train a model package from a JSON config; ``train make-dataset``: a dataset.json."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

TRAIN_USAGE = """\
meddiffseg train --config FILE --out DIR [--method M] [--max-steps N] [--resume]
                        [--data-root DIR] [--device {auto,cpu,cuda}] [--checkpoint-every N]
                        [--amp {auto,off,bf16,fp16}] [--tensorboard] [--quiet]
       meddiffseg train make-dataset --images DIR --labels DIR --table FILE --modality {CT,MR}
                        --out FILE [options]"""

TRAIN_DESCRIPTION = """\
Train a diffusion segmentation model from a JSON training config and write an installable
model package (OUT/<name>/ and OUT/<name>.zip, for 'meddiffseg segment --model' or
'meddiffseg models install').

Training runs in stages (the mask autoencoder first, then the denoiser) with AdamW and a
cosine learning-rate schedule, mixed precision on a GPU, validation Dice per organ every
'val_every' steps, and checkpoints every 'checkpoint_every' steps and at the end of each
stage. Ctrl-C (or SIGTERM) stops after the current step and writes a checkpoint; run the
same command with --resume to continue from that step: the result is identical to an
uninterrupted run (bit for bit on a CPU).
"""

TRAIN_EPILOG = """\
data:
  'train' and 'validation' entries are single labelled volumes
      {"image": "ct.nii.gz", "label": "labels.nii.gz", "table": "<key of name_tables>"}
  or whole datasets described by a Decathlon / nnU-Net dataset.json
      {"dataset": "mydata/dataset.json", "split": "training"}
  (write one with 'meddiffseg train make-dataset'). Relative paths are resolved against
  --data-root (default: $MEDDIFFSEG_DATA if set, else the config file's folder).

outputs (in --out DIR):
  <name>/ and <name>.zip   the model package (model.json records data, steps, hardware,
                           wall time and validation metrics)
  train_log.csv            loss and learning rate every 'log_every' steps
  validation.csv           validation Dice per organ
  history.json             stage timings and validation history
  checkpoints/             the two newest checkpoints (safetensors + JSON)
  tensorboard/             with --tensorboard (needs the tensorboard package)

several GPUs:
  torchrun --nproc_per_node 4 -m MedDiffSegLib train --config cfg.json --out runs/a
  ('batch' in the config is per process; rank 0 writes all files)

examples:
  meddiffseg train --config my-liver.json --out runs/liver
  meddiffseg train --config my-liver.json --out runs/liver --resume
  meddiffseg train --config my-liver.json --out runs/smoke --max-steps 20 --device cpu
"""

MAKE_DATASET_DESCRIPTION = """\
Write a dataset.json (Medical Segmentation Decathlon style) for 'meddiffseg train' from a
folder of images, a folder of label maps and a label table. Images and label maps are
paired by file name without extension (an image 'case_0000.nii.gz' also pairs with a label
'case.nii.gz', as in nnU-Net); a folder inside the images folder is read as one DICOM
series. Every unpaired file is reported and nothing is written.

The label table maps organ names to the label values of the label maps, as CSV
("liver,1" per line, an optional header) or JSON ({"liver": 1, "spleen": 2}).
Organ names are matched with the 'organs' of the training config.
"""

MAKE_DATASET_EPILOG = """\
example:
  meddiffseg train make-dataset --images data/images --labels data/labels \\
      --table data/labels.csv --modality CT --validation-fraction 0.2 --out data/dataset.json
"""


def methods_text() -> str:
    """The methods for ``--help``, one line each (read from their source: no torch import)."""
    from ..registry.card import method_summaries

    summaries = method_summaries()
    width = max(map(len, summaries), default=0) + 2
    return "methods (--method M, or \"method\" in the config):\n" + "".join(
        f"  {name:<{width}}{text}\n" for name, text in summaries.items())


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model package from a config (also: train make-dataset)",
                       usage=TRAIN_USAGE, description=TRAIN_DESCRIPTION, epilog=methods_text() + "\n" + TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="training config (JSON); required")
    p.add_argument("--out", metavar="DIR", help="output folder for the run; required")
    p.add_argument("--method", metavar="M",
                   help="train this method (see 'methods' below) instead of the config's (with its default config, "
                        "or its tiny one when the config says \"method_config\": \"tiny\")")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap every stage at N steps (smoke runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (starts afresh if there is none)")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder that relative data paths are resolved against "
                        "(default: $MEDDIFFSEG_DATA if set, else the config file's folder)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="compute device: auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint interval in steps (default: the config's)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision for this run (default: the config's 'amp'; auto = a GPU's bf16 or fp16, none on a "
                        "CPU); bf16 about halves a step on a CPU with bf16 units. A run setting: --resume may change it")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs (needs tensorboard)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=_cmd_train)

    tsub = p.add_subparsers(dest="train_command", metavar="{make-dataset}")
    m = tsub.add_parser("make-dataset", help="write a dataset.json from image and label folders",
                        description=MAKE_DATASET_DESCRIPTION, epilog=MAKE_DATASET_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--images", required=True, metavar="DIR", help="folder of images (volume files or DICOM folders)")
    m.add_argument("--labels", required=True, metavar="DIR", help="folder of label maps")
    m.add_argument("--table", required=True, metavar="FILE", help="label table: CSV (name,value) or JSON {name: value}")
    m.add_argument("--modality", required=True, metavar="{CT,MR}", help="image modality: CT or MR")
    m.add_argument("--out", dest="dataset_out", required=True, metavar="FILE",
                   help="dataset.json to write (paths in it are relative to its folder)")
    m.add_argument("--name", dest="dataset_name", help="dataset name (default: the output folder's name)")
    m.add_argument("--validation-cases", metavar="A,B,...", default="",
                   help="cases (file names without extension) to keep out of training for validation")
    m.add_argument("--validation-fraction", type=float, default=0.0, metavar="F",
                   help="also hold out this fraction of the cases for validation, chosen with --seed")
    m.add_argument("--seed", type=int, default=0, help="seed for --validation-fraction (default: 0)")
    m.add_argument("--no-check", action="store_true", help="do not read the file headers to check each pair")
    m.add_argument("--force", action="store_true", help="overwrite an existing dataset.json")
    m.set_defaults(func=_cmd_make_dataset)


class _StopOnSignal:
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, stop; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if os.environ.get("RANK", "0") == "0":
            print("\nmeddiffseg: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        return False


def _cmd_train(args) -> int:
    from ..errors import MedDiffSegError
    from ..training import TrainConfig, train

    missing = [o for o, v in (("--config", args.config), ("--out", args.out)) if not v]
    if missing:
        raise MedDiffSegError(f"meddiffseg train needs {' and '.join(missing)} (see 'meddiffseg train --help')")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise MedDiffSegError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    cfg = TrainConfig.from_file(args.config)
    data_root = args.data_root or os.environ.get("MEDDIFFSEG_DATA") or str(Path(args.config).resolve().parent)
    quiet = args.quiet
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    with _StopOnSignal() as stop:
        pkg = train(cfg, args.out, data_root=data_root, log=log, device=args.device, resume=args.resume,
                    method=args.method, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                    amp=args.amp, progress=not quiet and sys.stderr.isatty(), tensorboard=args.tensorboard, should_stop=stop)
    if pkg is not None and not quiet:
        dice = pkg.metrics.get("validation", {}).get("dice", {})
        print(f"model package: {pkg.path}")
        print(f"install with:  meddiffseg models install {Path(args.out) / (pkg.name + '.zip')}")
        if dice:
            print("validation Dice: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in dice.items()))
    return 0


def _cmd_make_dataset(args) -> int:
    from ..training.datasets import make_dataset

    val = [v.strip() for v in args.validation_cases.split(",") if v.strip()]
    ds = make_dataset(args.images, args.labels, args.table, args.dataset_out, modality=args.modality,
                      name=args.dataset_name, validation_cases=val, validation_fraction=args.validation_fraction,
                      seed=args.seed, check=not args.no_check, overwrite=args.force)
    n_train, n_val = len(ds.cases("training")), len(ds.cases("validation"))
    print(f"wrote {ds.path}: {n_train} training and {n_val} validation case(s), {ds.modality}, "
          f"labels {', '.join(f'{k}={v}' for k, v in ds.labels.items())}")
    return 0
