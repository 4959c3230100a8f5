"""Prompt maps: what a user says about one organ, as condition channels on the model's grid.

A method that supports interactive correction (``Method.prompt_channels == 4``) takes, per
organ row, four maps on the window's grid beside the image:

====  ===========  =====================================================================
ch    name         value
====  ===========  =====================================================================
0     positive     ``max(0, 1 - d/R)`` with ``d`` the 3D distance in mm to the nearest
                   positive click (``R``: the package's ``click_radius_mm``); 0 without one
1     negative     the same for the negative clicks ("not this organ")
2     box          +1 inside the box, -1 outside it; 0 everywhere without a box
3     previous     +1 inside the previous result's mask, -1 outside it; 0 without one
====  ===========  =====================================================================

Every channel is 0 where the user said nothing, so an all-zero prompt is the automatic
segmentation (the prompt encoder maps zero to exactly zero, :mod:`MedDiffSegLib.networks.prompts`).
Clicks are encoded as (truncated, linear) distance maps, not Gaussian blobs, and in 3D: a click on
one slice also reaches the neighbouring slices, weaker with the distance between them. That is how
a click propagates through the volume.

Training simulates the clicks a user would make from the model's own errors
(:func:`error_click`): the point deepest inside the largest error region, positive where the
organ is missed and negative where it is over-segmented (the CVPR 2025 interactive challenge's
oracle), as DeepEdit and nnInteractive train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

PROMPT_CHANNELS = 4
POSITIVE, NEGATIVE, BOX, PREVIOUS = range(PROMPT_CHANNELS)
#: Default reach of a click (mm): beyond it a click says nothing.
DEFAULT_CLICK_RADIUS_MM = 30.0


@dataclass(frozen=True)
class Click:
    """A click on the model's grid of one slice: row, column (pixels) and the slice distance (mm)."""

    row: float
    col: float
    positive: bool
    dz_mm: float = 0.0


def click_map(hw: Sequence[int], spacing_mm: Sequence[float], clicks: Sequence[Click], radius_mm: float,
              positive: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[H,W]`` float32: ``max(0, 1 - d/R)`` over the clicks of one sign (0 where none reaches)."""
    h, w = int(hw[0]), int(hw[1])
    m = out if out is not None else torch.zeros((h, w), dtype=torch.float32)
    sy, sx = float(spacing_mm[0]), float(spacing_mm[1])
    r = float(radius_mm)
    if r <= 0:
        raise ValueError(f"click radius must be > 0 mm, got {radius_mm}")
    for c in clicks:
        if bool(c.positive) != bool(positive) or abs(c.dz_mm) >= r:
            continue
        reach = (r * r - c.dz_mm * c.dz_mm) ** 0.5  # in-plane radius on this slice
        y0, y1 = max(0, int(np.floor(c.row - reach / sy))), min(h, int(np.ceil(c.row + reach / sy)) + 1)
        x0, x1 = max(0, int(np.floor(c.col - reach / sx))), min(w, int(np.ceil(c.col + reach / sx)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = (torch.arange(y0, y1, dtype=torch.float32) - c.row) * sy
        xx = (torch.arange(x0, x1, dtype=torch.float32) - c.col) * sx
        d = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2 + c.dz_mm ** 2)
        v = (1.0 - d / r).clamp_(min=0.0)
        torch.maximum(m[y0:y1, x0:x1], v, out=m[y0:y1, x0:x1])
    return m


def box_map(hw: Sequence[int], box: tuple[int, int, int, int] | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[H,W]``: +1 inside ``box`` = (row0, col0, row1, col1) (end exclusive), -1 outside; 0 without a box.

    A box that misses this slice (``(0, 0, 0, 0)``) gives -1 everywhere: the organ is not here.
    """
    h, w = int(hw[0]), int(hw[1])
    m = out if out is not None else torch.zeros((h, w), dtype=torch.float32)
    if box is None:
        m.zero_()
        return m
    r0, c0, r1, c1 = (int(v) for v in box)
    m.fill_(-1.0)
    m[max(0, r0):max(0, min(h, r1)), max(0, c0):max(0, min(w, c1))] = 1.0
    return m


def previous_map(prob: torch.Tensor | None, hw: Sequence[int]) -> torch.Tensor:
    """``[H,W]``: +1 where the previous result has the organ (probability >= 0.5), -1 elsewhere; 0 without one.

    Binary on purpose: a result on disk is a label map, and a model trained on its own soft
    probabilities would see something else when it refines one.
    """
    if prob is None:
        return torch.zeros((int(hw[0]), int(hw[1])), dtype=torch.float32)
    return (prob >= 0.5).to(torch.float32) * 2.0 - 1.0


def prompt_maps(hw: Sequence[int], spacing_mm: Sequence[float], clicks: Sequence[Click] = (),
                box: tuple[int, int, int, int] | None = None, previous: torch.Tensor | None = None,
                radius_mm: float = DEFAULT_CLICK_RADIUS_MM) -> torch.Tensor:
    """``[4,H,W]``: the four channels of one organ row (see the module docstring)."""
    out = torch.zeros((PROMPT_CHANNELS, int(hw[0]), int(hw[1])), dtype=torch.float32)
    click_map(hw, spacing_mm, clicks, radius_mm, True, out[POSITIVE])
    click_map(hw, spacing_mm, clicks, radius_mm, False, out[NEGATIVE])
    box_map(hw, box, out[BOX])
    out[PREVIOUS] = previous_map(previous, hw)
    return out


def deepest_point(labels: np.ndarray, index: int, box: tuple[slice, ...],
                  spacing_mm: Sequence[float]) -> tuple[int, ...]:
    """The voxel of region ``index`` of ``labels`` (inside its bounding ``box``) farthest from the
    region's border (the Euclidean distance transform's maximum, in mm); ties go to the first in
    row-major order."""
    from scipy import ndimage

    region = labels[box] == index
    n = region.ndim
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=tuple(float(s) for s in spacing_mm))
    depth = depth[(slice(1, -1),) * n]
    at = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return tuple(int(s.start) + int(i) for s, i in zip(box, at))


def deepest_error(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float],
                  min_size: int = 1, prefer: bool | None = None) -> tuple[tuple[int, ...], bool] | None:
    """The oracle's next click for ``pred`` against ``gt`` (bool arrays, 2D or 3D), or None when they agree.

    The largest fully connected error region (missed organ and over-segmentation are separate
    regions; a tie goes to the missed organ) is found; the click goes to its point farthest from
    the region's border (:func:`deepest_point`, in mm), positive when the region is missed organ
    (the CVPR 2025 interactive challenge's rule). Regions smaller than ``min_size`` voxels are
    ignored. With ``prefer`` (True: missed organ, False: over-segmentation) the largest region of
    that kind is taken whenever there is one (training uses it to show the model enough negative
    clicks). Returns ``(index, positive)``.
    """
    from scipy import ndimage

    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    best = None
    structure = np.ones((3,) * pred.ndim, dtype=bool)
    for positive, err in ((True, gt & ~pred), (False, pred & ~gt)):
        if not err.any():
            continue
        lab, _ = ndimage.label(err, structure=structure)
        sizes = np.bincount(lab.ravel())[1:]
        k = int(np.argmax(sizes))
        if sizes[k] < min_size:
            continue
        if positive == prefer:
            best = (int(sizes[k]), positive, lab, k + 1)
            break
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), positive, lab, k + 1)
    if best is None:
        return None
    _, positive, lab, index = best
    box = ndimage.find_objects(lab, max_label=index)[index - 1]
    return deepest_point(lab, index, box, spacing_mm), positive


def error_click(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0),
                min_pixels: int = 1, prefer: bool | None = None) -> tuple[int, int, bool] | None:
    """The oracle's next click on a 2D slice, ``(row, col, positive)``, or None (:func:`deepest_error`)."""
    found = deepest_error(pred, gt, spacing_mm, min_pixels, prefer)
    if found is None:
        return None
    (r, c), positive = found
    return r, c, positive
