"""Missed structure: where an organ probably continues but was not segmented.

The variance of an ensemble says where samples disagree; it is silent where every sample
agrees on "background" with a low but non-zero probability - which is how a model misses the
top slices of a liver under the diaphragm or the pole of a kidney. This module looks for that
pattern from the organ's *mean* probability: beyond the first and last slice of the organ's
final mask (and in slices missing inside its extent), it measures the probability-weighted area
that lies next to the mask and is below the label threshold.

Definitions (all on a coarse in-plane grid of blocks of about 4 mm, kept by the engine as the
block-mean of the organ's mean probability, so that a whole CT costs a few MB):

- A block is *probable* when its mean probability is at least ``min_probability`` (0.1).
- The *footprint* starts as the organ's mask on its edge slice (blocks holding any voxel of
  it), dilated by ``dilate_mm`` (10 mm). Walking one slice outward, the slice's *continuation
  area* is the sum over probable blocks inside the footprint of probability × block area (mm²).
  The footprint then moves to the probable blocks found, dilated again, so that a sloping organ
  is followed; the walk stops at the first slice whose area is below ``min_area_mm2`` (100 mm²,
  i.e. 1 cm² of certain organ or 2 cm² at p = 0.5), or after ``max_extent_mm`` (50 mm).
- A *gap* is a slice inside the mask's extent without any voxel of the organ but with a
  continuation area (footprint: the neighbouring slices' masks, dilated) of at least the minimum.
- An organ with an empty mask is reported as *not segmented* when some slice has probable
  blocks covering at least the minimum area; its most probable slice is given.

The thresholds are fixed, documented defaults (not fitted to test patients);
``docs/uncertainty.md`` reports how often the signal finds truly missed slices on the
protocol's patients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

#: Target size (mm) of one block of the coarse probability grid the engine keeps.
BLOCK_MM = 4.0
MIN_PROBABILITY = 0.1
MIN_AREA_MM2 = 100.0
DILATE_MM = 10.0
MAX_EXTENT_MM = 50.0


@dataclass
class Continuation:
    """One run of slices where the organ probably continues unsegmented (canonical slice indices)."""

    kind: str  # "before" / "after" the mask's extent along the canonical slice axis, "gap", or "not_segmented"
    slices: list[int]
    area_mm2: list[float]  # continuation area of each slice
    peak_slice: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slices and self.peak_slice < 0:
            self.peak_slice = int(self.slices[int(np.argmax(self.area_mm2))])


def block_size(spacing_ji: tuple[float, float], block_mm: float = BLOCK_MM) -> tuple[int, int]:
    """Pixels per block along (J, I) so that a block is about ``block_mm`` wide (at least 1 pixel)."""
    return tuple(max(1, int(round(block_mm / float(s)))) for s in spacing_ji)  # type: ignore[return-value]


def coarse_mask(mask2d: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Blocks (of ``block`` pixels) holding any voxel of ``mask2d``, on a grid of ``shape`` blocks."""
    bj, bi = block
    h, w = shape
    padded = np.zeros((h * bj, w * bi), dtype=bool)
    padded[: mask2d.shape[0], : mask2d.shape[1]] = mask2d
    return padded.reshape(h, bj, w, bi).any(axis=(1, 3))


def _disk(radius_blocks: tuple[float, float]) -> np.ndarray:
    rj, ri = (max(0.0, r) for r in radius_blocks)
    nj, ni = int(np.floor(rj)), int(np.floor(ri))
    jj, ii = np.mgrid[-nj:nj + 1, -ni:ni + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (jj / rj if rj > 0 else jj * np.inf) ** 2 + (ii / ri if ri > 0 else ii * np.inf) ** 2
    return np.nan_to_num(d, nan=0.0) <= 1.0


def find_continuations(
    coarse_prob: np.ndarray,
    slice_counts: np.ndarray,
    edge_mask,
    *,
    block_mm: tuple[float, float],
    slice_mm: float,
    min_probability: float = MIN_PROBABILITY,
    min_area_mm2: float = MIN_AREA_MM2,
    dilate_mm: float = DILATE_MM,
    max_extent_mm: float = MAX_EXTENT_MM,
) -> list[Continuation]:
    """Runs of slices where one organ probably continues unsegmented; see the module docstring.

    ``coarse_prob``: ``[K, h, w]`` float block-mean probabilities of the organ. ``slice_counts``:
    ``[K]`` voxels of the organ's final mask per slice. ``edge_mask(k)``: the mask of slice ``k``
    on the block grid (bool ``[h, w]``). ``block_mm``: a block's size (mm) along J and I;
    ``slice_mm``: the slice spacing.
    """
    p = np.asarray(coarse_prob, dtype=np.float32)
    n_k = p.shape[0]
    counts = np.asarray(slice_counts)
    if counts.shape != (n_k,):
        raise ValueError(f"slice_counts must have shape [{n_k}], got {list(counts.shape)}")
    block_area = float(block_mm[0]) * float(block_mm[1])
    probable = p >= min_probability
    weighted = np.where(probable, p, 0.0) * block_area  # probability-weighted area per block (mm²)
    disk = _disk((dilate_mm / float(block_mm[0]), dilate_mm / float(block_mm[1])))

    def dilate(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(m, structure=disk) if m.any() else m

    present = np.flatnonzero(counts > 0)
    if present.size == 0:
        area = weighted.sum(axis=(1, 2))
        hits = np.flatnonzero(area >= min_area_mm2)
        if hits.size == 0:
            return []
        return [Continuation("not_segmented", hits.tolist(), [float(a) for a in area[hits]])]

    out: list[Continuation] = []
    max_slices = max(1, int(np.floor(max_extent_mm / float(slice_mm))))
    for kind, start, step in (("before", int(present[0]), -1), ("after", int(present[-1]), 1)):
        footprint = dilate(np.asarray(edge_mask(start), dtype=bool))
        slices, areas = [], []
        k = start + step
        while 0 <= k < n_k and len(slices) < max_slices:
            a = float(weighted[k][footprint].sum())
            if a < min_area_mm2:
                break
            slices.append(k)
            areas.append(a)
            footprint = dilate(probable[k] & footprint)
            k += step
        if slices:
            out.append(Continuation(kind, slices, areas))

    gaps = [int(k) for k in range(int(present[0]) + 1, int(present[-1])) if counts[k] == 0]
    g_slices, g_areas = [], []
    for k in gaps:
        pos = int(np.searchsorted(present, k))  # present[pos - 1] < k < present[pos]
        below, above = int(present[pos - 1]), int(present[pos])
        footprint = dilate(np.asarray(edge_mask(below), dtype=bool) | np.asarray(edge_mask(above), dtype=bool))
        a = float(weighted[k][footprint].sum())
        if a >= min_area_mm2:
            g_slices.append(k)
            g_areas.append(a)
    if g_slices:
        out.append(Continuation("gap", g_slices, g_areas))
    return out


def describe_run(run: dict[str, Any], axis: str | None = None) -> str:
    """One run of ``summary.json``'s ``possible_continuation`` in words (what ``segment`` prints for
    review and ``batch`` puts in its table), e.g. ``the organ probably continues beyond its superior
    end, unsegmented, on slices K 88-90 (8 mm, clearest on K 88)``; ``axis`` is the slices' IJK axis
    (``slice_axis_ijk``), shown before each index when given."""
    def at(index) -> str:
        return f"{axis} {index}" if axis else str(index)

    first, last = min(run["slices"]), max(run["slices"])
    where = f"on slice {at(first)}" if first == last else f"on slices {at(first)}-{last}"
    extent = f"{run['extent_mm']:.0f} mm, clearest on {at(run['peak_slice'])}"
    if run["kind"] == "beyond_mask":
        text = f"the organ probably continues beyond its {run.get('side') or 'end'} end, unsegmented, {where}"
    elif run["kind"] == "gap":
        text = f"the organ probably continues through a gap in the segmentation {where}"
    elif run["kind"] == "not_segmented":
        text = f"nothing was segmented, but the organ is probably there {where}"
    else:
        text = f"the organ probably continues ({run['kind']}) {where}"
    return f"{text} ({extent})"
