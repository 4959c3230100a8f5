"""``meddiffseg pretrain``: self-supervised pretraining of the dts conditional encoder on unlabelled images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PRETRAIN_DESCRIPTION = """\
Pretrain the conditional (image) encoder of the 'dts' method without labels, on windows of
unlabelled CT or MR slices: masked reconstruction (40% of the cells of a window replaced by
noise, L2), masked-location prediction (which region of a second view was replaced,
cross-entropy) and a contrastive loss between the two views (NT-Xent), weighted
L_rec + 0.1 L_loc + 0.01 L_cl. Label maps are never read.

Writes OUT/encoder.safetensors (the encoder's weights; its metadata records the encoder
configuration and the preprocessing), OUT/pretrain_log.csv and OUT/pretrain.json. Nothing is
written until the last step: an interrupted run leaves no partial result.
"""

PRETRAIN_EPILOG = """\
config (JSON):
  {"name": "dts-ssl", "method_config": null, "preprocessing": {"modality": "CT", ...},
   "images": [{"image": "ct.nii.gz"}, {"image": "mr.nii.gz", "modality": "MR"},
              {"dataset": "mydata/dataset.json", "split": "training"}],
   "roi": 128, "steps": 2000, "lr": 0.001, "batch": 8}
  'method_config' must describe the same encoder as the dts model you will train (null: the
  default one; "tiny": the tiny test one). Relative paths are resolved against --data-root
  (default: $MEDDIFFSEG_DATA if set, else the config file's folder).

start a training from it:
  add  "init_from": "OUT"  (the folder, or OUT/encoder.safetensors) to the training config of a
  dts model; a relative path is resolved against the current folder. The encoder's
  configuration must match the model's.

examples:
  meddiffseg pretrain --config dts-ssl-pretrain.json --out runs/dts-ssl
  meddiffseg pretrain --config dts-ssl-pretrain.json --out runs/smoke --max-steps 20 --device cpu
"""


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining of the dts image encoder on unlabelled images",
                       description=PRETRAIN_DESCRIPTION, epilog=PRETRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="pretraining config (JSON)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap the number of steps at N (smoke runs)")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder that relative image paths are resolved against "
                        "(default: $MEDDIFFSEG_DATA if set, else the config file's folder)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="compute device: auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--force", action="store_true", help="replace an encoder.safetensors already in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    from ..training.ssl import PretrainConfig, pretrain

    cfg = PretrainConfig.from_file(args.config)
    data_root = args.data_root or os.environ.get("MEDDIFFSEG_DATA") or str(Path(args.config).resolve().parent)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    result = pretrain(cfg, args.out, data_root=data_root, log=log, device=args.device, max_steps=args.max_steps,
                      force=args.force, progress=not args.quiet and sys.stderr.isatty())
    if not args.quiet:
        losses = result.summary["losses"]
        print(f"pretrained encoder: {result.encoder_path}")
        print("losses (first → last): " + ", ".join(
            f"{k} {losses['first'][k]:.4f} → {losses['last'][k]:.4f}" for k in ("rec", "loc", "cl")))
        print(f"start a dts training from it with  \"init_from\": \"{result.out_dir}\"  in its config")
    return 0
