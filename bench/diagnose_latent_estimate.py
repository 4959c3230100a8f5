#!/usr/bin/env python
"""How well a latent ε-prediction package estimates the mask latent from one step, per timestep (issue #24).

    python bench/diagnose_latent_estimate.py PACKAGE [--case btcv_0002] [--slices 60 100] [--windows 16]
        [--t 10 100 300 600 900 999] [--seed 1]

Draws ``--windows`` foreground windows of one BTCV case (each with an organ the case labels as the
prompt, as training draws them), encodes their masks with the package's mask autoencoder (a latent
method, e.g. SDSeg) or takes them as the pixel-space target ``2·mask − 1`` (MedSegDiff-V2), noises
that at each fixed ``t`` with the package's schedule, and estimates it from the denoiser's ε
(``eps_to_x0``, SDSeg's latent estimation). Prints, per ``t``: ᾱ_t, the ε error, the estimate's
error (mean absolute; the target's sd is printed first) and the Dice of the (decoded) estimate
against the windows' masks; for MedSegDiff-V2 also the Dice of its condition model's own anchor
prediction. A sampler starts at the last timestep: where the estimate is poor there, the first
steps are too. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--case", default="btcv_0002", help="a BTCV case (a training patient: this measures fit)")
    ap.add_argument("--slices", type=int, nargs=2, default=[60, 100], help="canonical slab [start, stop)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--t", type=int, nargs="+", default=[10, 100, 300, 600, 900, 999])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from MedDiffSegLib.registry import ModelPackage
    from MedDiffSegLib.sampling import eps_to_x0
    from MedDiffSegLib.training.data import SliceWindowSampler, load_labelled_volume
    from MedDiffSegLib.training.datasets import read_dataset

    torch.manual_seed(args.seed)
    pkg = ModelPackage.from_folder(args.package)
    pkg.verify()
    method = pkg.load_method("cpu").eval()
    pixel = pkg.method_name == "medsegdiff_v2"
    if getattr(method, "prediction_type", None) != "epsilon" or not (pixel or hasattr(method, "mask_autoencoder")):
        ap.error(f"{pkg.name} is neither a latent ε-prediction model nor MedSegDiff-V2 (method {pkg.method_name})")
    root = Path(os.environ.get("MEDDIFFSEG_DATA") or REPO.parent / "shared" / "data")
    ds = read_dataset(root / "btcv" / "dataset.json")
    case = next((c for c in ds.cases("training") if c.name == args.case), None)
    if case is None:
        ap.error(f"{args.case} is not a BTCV case")
    organs = pkg.organ_names
    vol = load_labelled_volume(case.image, case.label, ds.labels, organs, pkg.preprocessing, slices=tuple(args.slices))
    roi = int(pkg.inference["roi_size"][0])
    images, masks, ids = SliceWindowSampler([vol], len(organs), roi, foreground_fraction=1.0, seed=args.seed).batch(
        args.windows)
    masks = masks.float()

    def dice(p: torch.Tensor, g: torch.Tensor) -> float:
        return float((2 * (p * g).sum() + 1e-6) / (p.sum() + g.sum() + 1e-6))

    with torch.no_grad():
        print(f"{pkg.name} {pkg.version}: {args.windows} windows of {args.case} ({', '.join(organs[i] for i in ids.tolist())})")
        if pixel:  # the mask itself is diffused; the condition model's anchor also predicts it directly
            z0 = masks * 2 - 1
            cond = method.condition(images.float())
            logits, semantic = cond.anchor_logits[cond.rows, ids][:, None], cond.semantic[cond.rows]
            anchor = (method.anchor(images.float())[torch.arange(len(ids)), ids][:, None] > 0.5).float()
            print(f"anchor (condition model) Dice {dice(anchor, masks):.3f}; target sd {float(z0.std()):.3f}")

            def predict_eps(z_t, t):
                return method.diffusion_model(z_t, t, ids, logits, semantic).float()

            def to_mask(z0_hat):
                return (z0_hat > 0).float()
        else:
            z0 = method.mask_autoencoder.encode(masks).float()
            rec = (torch.sigmoid(method.mask_autoencoder.decode(z0)) > 0.5).float()
            print(f"autoencoder round trip Dice {dice(rec, masks):.3f}; latent sd {float(z0.std()):.3f}")
            cond = method.image_encoder(images.float())

            def predict_eps(z_t, t):
                return method.denoiser(z_t, t, cond, ids).float()

            def to_mask(z0_hat):
                return (torch.sigmoid(method.mask_autoencoder.decode(z0_hat.clamp(-1, 1))) > 0.5).float()
        what = "mask" if pixel else "latent"
        print(f"| t | ᾱ_t | ε MAE | {what} estimate MAE | {'thresholded' if pixel else 'decoded'} Dice |\n"
              "| --- | --- | --- | --- | --- |")
        for tv in args.t:
            t = torch.full((args.windows,), tv, dtype=torch.long)
            alpha_bar = method._alpha_bar(t, z0.device)
            noise = torch.randn_like(z0)
            a = alpha_bar.view(-1, 1, 1, 1)
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
            eps = predict_eps(z_t, t)
            z0_hat = eps_to_x0(z_t, eps, alpha_bar)
            pred = to_mask(z0_hat)
            print(f"| {tv} | {float(alpha_bar[0]):.4f} | {float((eps - noise).abs().mean()):.4f} | "
                  f"{float((z0_hat - z0).abs().mean()):.4f} | {dice(pred, masks):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
