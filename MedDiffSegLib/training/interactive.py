"""Interactive training: clicks simulated from the model's own errors (DeepEdit / nnInteractive style).

One model serves the automatic and the interactive segmentation. Each training window is, at
random, one of:

- **automatic** (``no_click_fraction`` of the windows, about half): no prompt at all, the
  automatic segmentation is trained as before;
- **refine**: the model's own automatic prediction of the window becomes the *previous mask*
  channel, then 1 to ``max_clicks`` rounds follow: the model predicts with the prompts so far,
  the oracle clicks the point deepest inside the largest error region of that prediction
  (positive where the organ is missed, negative where it is over-segmented,
  :func:`~MedDiffSegLib.interactive.prompts.error_click`), and the prediction becomes the
  previous mask of the next round. The loss is taken on the last round's prompts;
- **box** (``box_fraction`` of the refine windows): the first prompt is a box around the true
  organ (its in-plane bounding box, jittered by a few pixels) instead of an automatic
  prediction, followed by 0 to ``max_clicks`` clicks.

A click may also be simulated as coming from a neighbouring slice (``neighbour_fraction``): its
distance map is then that of a point ``dz`` mm away, as a click propagates through the volume at
inference. The predictions of the rounds are computed without gradients with the model being
trained, so the clicks follow its current errors. Randomness comes from the trainer's generators
(numpy for the choices, torch for the diffusion noise), so a resumed run stays bit-identical.

The config's ``interactive`` block::

    {"no_click_fraction": 0.5, "box_fraction": 0.25, "max_clicks": 3,
     "click_radius_mm": 30.0, "neighbour_fraction": 0.3,
     "negative_fraction": 0.0, "error_weight": 0.0}

Two options for a run that teaches corrections harder (both off by default):

- ``negative_fraction``: the share of click rounds that click the largest *over-segmented* region
  whenever the prediction has one, instead of the oracle's largest error of either kind (which
  picks missed organ about three times as often, so negative clicks are learned late);
- ``error_weight`` ``α``: the denoiser loss of a prompted row weighs each latent pixel by
  ``1 + α·e``, with ``e`` the share of its 8×8 pixels where the previous mask the row was given
  is wrong, so the loss looks where the correction has to happen (:func:`error_weights`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..interactive.prompts import (
    BOX,
    DEFAULT_CLICK_RADIUS_MM,
    NEGATIVE,
    POSITIVE,
    PREVIOUS,
    PROMPT_CHANNELS,
    Click,
    box_map,
    click_map,
    error_click,
    previous_map,
)

DEFAULTS = {"no_click_fraction": 0.5, "box_fraction": 0.25, "max_clicks": 3,
            "click_radius_mm": DEFAULT_CLICK_RADIUS_MM, "neighbour_fraction": 0.3,
            "negative_fraction": 0.0, "error_weight": 0.0}


def interactive_settings(block: dict | None) -> dict | None:
    """The ``interactive`` block with defaults filled in (None when the block is empty: no prompts)."""
    if not block:
        return None
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown interactive settings {unknown}; known: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **block}
    for key in ("no_click_fraction", "box_fraction", "neighbour_fraction", "negative_fraction"):
        if not 0.0 <= float(s[key]) <= 1.0:
            raise ValueError(f"interactive.{key} must be in [0, 1], got {s[key]}")
    if int(s["max_clicks"]) < 1:
        raise ValueError(f"interactive.max_clicks must be >= 1, got {s['max_clicks']}")
    if float(s["click_radius_mm"]) <= 0:
        raise ValueError(f"interactive.click_radius_mm must be > 0, got {s['click_radius_mm']}")
    if float(s["error_weight"]) < 0:
        raise ValueError(f"interactive.error_weight must be >= 0, got {s['error_weight']}")
    return s


def jittered_box(gt: np.ndarray, rng: np.random.Generator, jitter: int = 3) -> tuple[int, int, int, int] | None:
    """The in-plane bounding box (row0, col0, row1, col1; end exclusive) of ``gt`` grown or shrunk by up
    to ``jitter`` pixels per side, as a user draws it; None when ``gt`` is empty."""
    rows, cols = np.flatnonzero(gt.any(1)), np.flatnonzero(gt.any(0))
    if rows.size == 0:
        return None
    d = rng.integers(-1, jitter + 1, size=4)  # mostly a little larger than the organ
    h, w = gt.shape
    return (max(0, int(rows[0] - d[0])), max(0, int(cols[0] - d[1])),
            min(h, int(rows[-1] + 1 + d[2])), min(w, int(cols[-1] + 1 + d[3])))


@torch.no_grad()
def _predict(method, cond: torch.Tensor, organ_ids: torch.Tensor, prompts: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    return method.sample(cond, organ_ids, 1, 1, generator, prompts=prompts)[:, 0].float()


def simulate_prompts(method, images: torch.Tensor, masks: torch.Tensor, organ_ids: torch.Tensor,
                     rng: np.random.Generator, generator: torch.Generator | None, settings: dict,
                     spacing_mm: Sequence[float]) -> torch.Tensor:
    """Prompt maps ``[B,4,H,W]`` for a training batch (all zero for the automatic rows).

    ``masks`` ``[B,1,H,W]`` are the (possibly soft) targets; the oracle clicks on ``masks >= 0.5``.
    """
    b, _, h, w = masks.shape
    prompts = torch.zeros((b, PROMPT_CHANNELS, h, w), dtype=torch.float32, device=masks.device)
    interactive = rng.random(b) >= float(settings["no_click_fraction"])
    rows = np.flatnonzero(interactive)
    if rows.size == 0:
        return prompts
    radius = float(settings["click_radius_mm"])
    negative = float(settings.get("negative_fraction", 0.0))
    gt = (masks[:, 0] >= 0.5).cpu().numpy()
    use_box = rng.random(b) < float(settings["box_fraction"])
    n_clicks = np.zeros(b, dtype=int)
    clicks: dict[int, list[Click]] = {int(i): [] for i in rows}
    max_clicks = int(settings["max_clicks"])
    for i in rows:
        box = jittered_box(gt[i], rng) if use_box[i] else None
        if box is not None:
            box_map((h, w), box, prompts[i, BOX])
            n_clicks[i] = int(rng.integers(0, max_clicks + 1))
        else:
            use_box[i] = False
            n_clicks[i] = int(rng.integers(1, max_clicks + 1))
    was_training = method.training
    method.eval()
    try:
        idx = torch.as_tensor(rows, dtype=torch.long, device=images.device)
        cond = method.condition(images[idx])
        ids = organ_ids[idx]
        # Round 0 predicts with what the user gave first (nothing, or the box); each round then clicks
        # on that prediction's largest error and makes the prediction the previous mask.
        for r in range(int(n_clicks[rows].max(initial=0))):
            active = [k for k, i in enumerate(rows) if n_clicks[i] > r]
            if not active:
                break
            sel = torch.as_tensor(active, dtype=torch.long, device=images.device)
            probs = _predict(method, method.select_condition(cond, sel), ids[sel], prompts[idx[sel]], generator)
            for k, p in zip(active, probs):
                i = int(rows[k])
                pred = (p >= 0.5).cpu().numpy()
                prompts[i, PREVIOUS] = previous_map(p, (h, w))
                # (no draw without negative_fraction: a run started before the option resumes bit for bit)
                prefer = False if negative and rng.random() < negative else None
                found = error_click(pred, gt[i], spacing_mm, prefer=prefer)
                if found is None:
                    continue
                dz = float(rng.uniform(0.0, 0.8 * radius)) if rng.random() < float(settings["neighbour_fraction"]) else 0.0
                clicks[i].append(Click(found[0], found[1], found[2], dz))
                channel = POSITIVE if found[2] else NEGATIVE
                click_map((h, w), spacing_mm, clicks[i], radius, found[2], prompts[i, channel])
    finally:
        method.train(was_training)
    return prompts


def error_weights(prompts: torch.Tensor, masks: torch.Tensor, weight: float, factor: int) -> torch.Tensor | None:
    """Per latent pixel loss weights ``[B,1,H/factor,W/factor]``: ``1 + weight·e`` (see the module docstring).

    ``e`` is the share of the pixel's ``factor × factor`` block where the previous-mask channel
    disagrees with the target (``masks >= 0.5``); rows without a previous mask weigh 1 everywhere.
    None when ``weight`` is 0.
    """
    if weight <= 0:
        return None
    prev = prompts[:, PREVIOUS:PREVIOUS + 1]
    wrong = ((prev > 0) != (masks >= 0.5)) & (prev != 0)
    e = torch.nn.functional.avg_pool2d(wrong.float(), factor)
    return 1.0 + float(weight) * e
