"""What limits a latent 2D model before any training: the resampling and autoencoder ceilings.

For every case of the training patients and every organ it measures, on the input's own grid
(what the protocol scores), the Dice of the *true* mask after it went through:

- ``resample``: the model's in-plane grid and back. The mask is taken to the model spacing with
  nearest neighbour (exactly how training targets are made, ``training/data.py``), then back to
  the input grid as the engine takes probabilities back (bilinear, threshold 0.5). No model
  trained on those targets can beat it.
- ``area``: the same with an area-weighted (anti-aliased) downsampling: the ceiling of a model
  that predicts each model pixel's organ fraction.
- ``ae``: the nearest-resampled mask encoded and decoded by a mask autoencoder (a package's, in
  ``--windows``×``--windows`` windows centred on the slice as in inference), probability back to
  the input grid, threshold 0.5. This is the ceiling of a latent model with that autoencoder.

Only slices are used on which the organ is present (Dice of an organ is a property of where it
is; empty slices stay empty for every stage and only add true negatives).

    python bench/measure_ceiling.py --out runs/ceiling/ceiling.json            # shipped abdomen-ct AE
    python bench/measure_ceiling.py --spacing 1.5 1.5 --no-ae --out ...          # another grid
    python bench/measure_ceiling.py --package runs/ae/pkg --out ...              # a retrained AE

Prints a table (mean, min over cases) per organ and writes every per-case figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffSegLib.io import CanonicalView, read_volume  # noqa: E402
from MedDiffSegLib.preprocessing import inplane_size, resample_inplane  # noqa: E402
from MedDiffSegLib.training.data import _labels_on_image_grid  # noqa: E402
from MedDiffSegLib.training.datasets import read_dataset  # noqa: E402

BTCV_ORGANS = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
               "adrenal_gland_left"]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2 * int((a & b).sum()) / s) if s else float("nan")


def data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA", ROOT.parent / "shared" / "data"))


def training_cases(dataset: str) -> list[str]:
    protocol = json.loads((ROOT / "bench" / "protocol.json").read_text())
    return list(protocol["datasets"][dataset]["train"])


@torch.no_grad()
def autoencode(ae, masks: torch.Tensor, windows: int, batch: int = 16) -> torch.Tensor:
    """Probabilities ``[S,H,W]`` of ``masks`` ``[S,H,W]`` (model grid) after encode → decode."""
    s, h, w = masks.shape
    hp, wp = max(windows, math.ceil(h / 8) * 8), max(windows, math.ceil(w / 8) * 8)
    y0, x0 = (hp - h) // 2, (wp - w) // 2
    out = torch.empty((s, h, w))
    for i in range(0, s, batch):
        m = torch.zeros((min(batch, s - i), 1, hp, wp))
        m[:, 0, y0:y0 + h, x0:x0 + w] = masks[i:i + batch].float()
        p = torch.sigmoid(ae.decode(ae.encode(m)).float())
        out[i:i + batch] = p[:, 0, y0:y0 + h, x0:x0 + w]
    return out


def run_autoencoder(run: Path, config: Path):
    """The mask autoencoder of a training run's latest checkpoint (the model built from its config)."""
    from MedDiffSegLib.methods.base import build_method
    from MedDiffSegLib.training.checkpoint import latest_checkpoint, load_checkpoint
    from MedDiffSegLib.training.trainer import TrainConfig, method_config_for

    ck = latest_checkpoint(run)
    if ck is None:
        raise SystemExit(f"{run} has no checkpoint")
    tensors, meta = load_checkpoint(ck)
    cfg = TrainConfig.from_file(config)
    method = build_method(cfg.method, method_config_for(cfg, len(cfg.organs)))
    method.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    print(f"{ck.name}: stage {meta.get('stage_index')}, step {meta.get('step')}", file=sys.stderr)
    return method.mask_autoencoder.float().eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="btcv")
    ap.add_argument("--cases", nargs="*", help="default: the protocol's training patients")
    ap.add_argument("--organs", nargs="*", default=BTCV_ORGANS)
    ap.add_argument("--spacing", nargs=2, type=float, default=[2.0, 2.0], metavar=("ROW_MM", "COL_MM"))
    ap.add_argument("--package", default="abdomen-ct", help="model package whose mask autoencoder is measured")
    ap.add_argument("--run", help="a training run folder instead: its latest checkpoint's autoencoder")
    ap.add_argument("--config", help="the training config of --run")
    ap.add_argument("--soft", action="store_true",
                    help="the autoencoder reads area fractions (a model trained with soft_targets), not nearest masks")
    ap.add_argument("--no-ae", action="store_true", help="resampling ceilings only")
    ap.add_argument("--windows", type=int, default=224)
    ap.add_argument("--out", required=True, help="JSON of every per-case figure")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    ds = read_dataset(data_root() / args.dataset / "dataset.json")
    wanted = args.cases or training_cases(args.dataset)
    cases = {c.name: c for c in ds.cases("training")}
    missing = [c for c in wanted if c not in cases]
    if missing:
        ap.error(f"cases not in {args.dataset}: {', '.join(missing)}")
    table = ds.labels
    ae = None
    if args.run:
        if not args.config:
            ap.error("--run needs --config")
        ae = run_autoencoder(Path(args.run), Path(args.config))
        args.package = f"run {args.run}"
    elif not args.no_ae:
        from MedDiffSegLib.registry.store import resolve_model

        pkg = resolve_model(args.package)
        ae = pkg.load_method("cpu").mask_autoencoder.float().eval()
    stages = ["resample", "area"] + ([] if ae is None else ["ae", "ae_model_grid"])
    rows: dict[str, dict[str, dict[str, float]]] = {o: {s: {} for s in stages} for o in args.organs}
    t0 = time.time()
    for name in wanted:
        c = cases[name]
        image = read_volume(c.image)
        label = _labels_on_image_grid(sitk.ReadImage(str(c.label)), image)
        view = CanonicalView.from_image(image, "LPS")
        lab = np.ascontiguousarray(view.to_canonical(sitk.GetArrayFromImage(label)))
        _, sj, si = view.spacing_kji
        canon_hw = lab.shape[1:]
        size = inplane_size(canon_hw, (sj, si), args.spacing)
        for organ in args.organs:
            if organ not in table:
                continue
            gt_all = torch.from_numpy(lab == table[organ])
            ks = torch.nonzero(gt_all.flatten(1).any(1)).flatten()
            if ks.numel() == 0:
                continue
            gt = gt_all[ks]
            y = resample_inplane(gt[:, None].float(), size, mode="nearest")[:, 0]
            back = resample_inplane(y[:, None], canon_hw)[:, 0] >= 0.5
            rows[organ]["resample"][name] = dice(back, gt)
            area = torch.nn.functional.interpolate(gt[:, None].float(), size=size, mode="bilinear",
                                                   antialias=True, align_corners=False)
            back = resample_inplane(area, canon_hw)[:, 0] >= 0.5
            rows[organ]["area"][name] = dice(back, gt)
            if ae is not None:
                p = autoencode(ae, area[:, 0] if args.soft else y, args.windows)
                rows[organ]["ae_model_grid"][name] = dice(p >= 0.5, y >= 0.5)
                back = resample_inplane(p[:, None], canon_hw)[:, 0] >= 0.5
                rows[organ]["ae"][name] = dice(back, gt)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    out = {"dataset": args.dataset, "cases": wanted, "spacing_mm": args.spacing,
           "package": None if ae is None else args.package, "windows": args.windows,
           "command": "python bench/measure_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dice": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nDice of the true mask through each stage, {len(wanted)} {args.dataset} training cases, "
          f"{args.spacing[0]}x{args.spacing[1]} mm: mean (min)")
    print("| organ | " + " | ".join(stages) + " |")
    print("| --- |" + " --- |" * len(stages))
    for organ in args.organs:
        cells = []
        for s in stages:
            v = [x for x in rows[organ][s].values() if math.isfinite(x)]
            cells.append(f"{np.mean(v):.3f} ({np.min(v):.3f})" if v else "-")
        print(f"| {organ} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
