#!/usr/bin/env python
"""Write a retrained package's MODEL_CARD.md from what the package records (issue #24).

    python bench/model_card.py PACKAGE --limitations FILE [--extras runs/seeds] [--dataset btcv] [--out F]

Everything in the card but the limitations comes from the package itself, so the card cannot
say more than was measured:

- what it is: ``description``, method, organs, preprocessing and inference defaults of ``model.json``;
- how it was trained: ``provenance`` (the config's stages, the training and validation patients,
  wall time, hardware, amp, parameters, the autoencoder it took from another package, the weights'
  storage) and the end-of-training validation Dice (``metrics.validation_dice_last``);
- how it scores: ``metrics.protocol`` (``bench/evaluate_protocol.py --record``: the test patients,
  mean ± sd, failures apart, the spread over the seeds, with the recorded command), as the
  tables of ``bench/compare_models.py``;
- with ``--extras``: the near-organ uncertainty and the seconds and memory per 512×512×200 CT
  that ``bench/evaluate_seeds.sh`` measured beside the packages.

``--limitations``: a Markdown file with what the numbers mean for a user (what the model misses,
why), written by whoever releases the package; the card ends with it under "Limitations".
Writes ``PACKAGE/MODEL_CARD.md`` (or ``--out``) atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from compare_models import extras_table, tables  # noqa: E402

TERMS = ("BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, Synapse): manual labels of 13 abdominal organs on "
         "portal-venous CTs; research use under the challenge's data terms (`../shared/data/PROVENANCE.md`). "
         "The weights are the project's own; they inherit the data's research-only terms.")


def _stages(prov: dict) -> str:
    parts = []
    for name, st in (prov.get("stages") or {}).items():
        if not st.get("steps"):
            continue
        seconds = st.get("seconds")
        parts.append(f"{name} {st['steps']} steps (batch {st.get('batch', '?')}, lr {st.get('lr', '?')}"
                     + (f", {seconds / 60:.0f} min" if seconds else "") + ")")
    return "; ".join(parts) or "—"


def _cases(prov: dict, split: str) -> str:
    groups = (prov.get("data") or {}).get(split) or []
    names = [c for g in groups for c in g.get("cases") or []]
    return f"{len(names)} ({', '.join(names)})" if names else "—"


def card(pkg, limitations: str, extras: Path | None = None, dataset: str = "btcv") -> str:
    prov, metrics = pkg.provenance, pkg.metrics
    hw = prov.get("hardware") or {}
    wall = prov.get("wall_time_s")
    params = prov.get("parameters")
    inf = pkg.inference
    pre = pkg.preprocessing
    lines = [
        f"# Model card: `{pkg.name}` {pkg.version}",
        "",
        pkg.description.strip(),
        "",
        "**Research use only. Not a medical device.**",
        "",
        "## What it is",
        f"- Method: `{pkg.method_name}`; organs ({len(pkg.organ_names)}): {', '.join(pkg.organ_names)}.",
        f"- Input: {pre.modality}, {pre.orientation} axial slices resampled in-plane to "
        f"{' × '.join(f'{s:g}' for s in pre.spacing)} mm"
        + (f", HU window [{pre.ct_window[0]:g}, {pre.ct_window[1]:g}]" if pre.modality == "CT" else "") + ".",
        f"- Inference defaults: {inf.get('steps', 1)} step(s) ({inf.get('scheduler') or 'the method sampler'}), "
        f"{inf.get('samples', 1)} sample(s), windows {'×'.join(str(r) for r in inf.get('roi_size', []))}, "
        f"overlap {inf.get('overlap', '—')}, threshold {inf.get('threshold', 0.5)}.",
        _postprocessing(inf),
        "",
        "## How it was trained",
        f"- Data: {TERMS}",
        f"- Training patients: {_cases(prov, 'train')}; validation (held out, used for nothing but the "
        f"end-of-training check): {_cases(prov, 'validation')}. The test patients below were used for nothing else.",
        f"- Stages: {_stages(prov)}.",
        f"- Wall time {wall / 60:.0f} min" if wall else "- Wall time: not recorded",
    ]
    lines[-1] += (f" on {hw.get('device', '?')}, {hw.get('processes', 1)} process(es), amp {prov.get('amp', 'off')}; "
                  f"torch {prov.get('torch', '?')}, MONAI {prov.get('monai', '?')}.")
    if params:
        lines.append(f"- Parameters: {params / 1e6:.2f} M.")
    ae = prov.get("mask_autoencoder_from")
    if ae:
        lines.append(f"- Mask autoencoder: taken from `{ae.get('package')}` {ae.get('version')} (weights sha256 "
                     f"{str(ae.get('sha256'))[:12]}…) and kept fixed.")
    storage = prov.get("weights_storage")
    if storage:
        lines.append(f"- Weights stored as {storage.get('dtype', storage) if isinstance(storage, dict) else storage}"
                     + (f" (converted from the fp32 weights, sha256 {str(storage.get('converted_from_sha256'))[:12]}…)"
                        if isinstance(storage, dict) and storage.get("converted_from_sha256") else "") + ".")
    val = metrics.get("validation_dice_last")
    if isinstance(val, dict) and val:
        shown = {k: v for k, v in val.items() if isinstance(v, (int, float))}
        lines.append("- End-of-training validation Dice (1 sample, the validation patients' slices): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()) + ".")
    lines += ["", "## How it scores (test patients, used for nothing else)", ""]
    proto = metrics.get("protocol")
    if not proto:
        lines.append("Not scored under the protocol yet.")
    else:
        if proto.get("command"):
            lines += [f"Command: `{proto['command']}`" + (f" ({proto['hardware']})" if proto.get("hardware") else ""), ""]
        lines.append(tables([pkg], dataset))
    if extras is not None:
        lines += ["", "## Uncertainty and cost", "", extras_table([pkg], extras)]
    lines += ["", "## Limitations", "", limitations.strip(), ""]
    return "\n".join(lines)


def _postprocessing(inf: dict) -> str:
    """The post-processing the engine applies by default (``inference.largest_component``), and where it was chosen."""
    organs = inf.get("largest_component") or []
    if not organs:
        return "- Post-processing: none (every connected component is kept)."
    chosen = inf.get("postprocessing_chosen_on")
    where = f", chosen on the held-out patients {', '.join(chosen)}" if chosen else ""
    return (f"- Post-processing: only the largest 3D connected component is kept for {', '.join(organs)}{where} "
            "(`--no-largest-component` turns it off).")


def main(argv=None) -> int:
    from MedDiffSegLib.registry import ModelPackage

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--limitations", type=Path, required=True, help="Markdown: what the numbers mean for a user")
    ap.add_argument("--extras", type=Path, help="what bench/evaluate_seeds.sh wrote beside the packages")
    ap.add_argument("--dataset", default="btcv")
    ap.add_argument("--out", type=Path, help="default: PACKAGE/MODEL_CARD.md")
    args = ap.parse_args(argv)
    pkg = ModelPackage.from_folder(args.package)
    text = card(pkg, args.limitations.read_text(encoding="utf-8"), args.extras, args.dataset)
    out = args.out or args.package / "MODEL_CARD.md"
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".card-", suffix=".md")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
