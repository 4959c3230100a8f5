"""Preprocessing from a model's spec, identical at training and inference time.

A model package's ``model.json`` carries a ``preprocessing`` block::

    {"modality": "CT", "orientation": "LPS", "spacing": [1.5, 1.5],
     "ct_window": [-200.0, 300.0], "mr_percentiles": [0.5, 99.5]}

- ``orientation``: the anatomical orientation code slices are taken in (SimpleITK's
  ``DICOMOrient`` convention: ``LPS`` means i runs to patient Left, j to Posterior, k to
  Superior, so an array ``[k, j, i]`` holds axial slices in radiological display order).
- ``spacing``: target in-plane spacing in mm, ``[row (j), column (i)]``. Slices are never
  resampled across slices: the engine is 2D.
- CT: clip to the HU window, then scale linearly to [-1, 1].
- MR: clip to the given percentiles of the volume's non-zero voxels, then scale to [-1, 1]
  (so the scanner's arbitrary intensity scale does not matter).
- ``context_slices``: how many axial slices a window sees (odd; 1 = the slice alone). With 3,
  the slice and its neighbours above and below are the input channels (2.5D context), which
  lets a 2D model tell where an organ starts and ends. ``context_spacing_mm`` places the
  neighbours at about that distance (``round(context_spacing_mm / slice thickness)`` slices,
  at least 1); 0 means the adjacent slices. Beyond the first and last slice the edge slice is
  repeated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import sys

import numpy as np

from ..errors import ModelError

# torch is imported only by the functions that work on tensors: the spec itself (read with every
# model package, also in Slicer's process before torch is installed) must not need it.

MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class PreprocessSpec:
    modality: str = "CT"
    orientation: str = "LPS"
    spacing: tuple[float, float] = (1.5, 1.5)
    ct_window: tuple[float, float] = (-200.0, 300.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    context_slices: int = 1
    context_spacing_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ModelError(f"preprocessing.modality must be one of {MODALITIES}, got {self.modality!r}")
        if len(self.spacing) != 2 or min(self.spacing) <= 0:
            raise ModelError(f"preprocessing.spacing must be two positive numbers (mm), got {self.spacing!r}")
        lo, hi = self.ct_window
        if not hi > lo:
            raise ModelError(f"preprocessing.ct_window must be [low, high] with high > low, got {self.ct_window!r}")
        plo, phi = self.mr_percentiles
        if not 0 <= plo < phi <= 100:
            raise ModelError(f"preprocessing.mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles!r}")
        if (isinstance(self.context_slices, bool) or not isinstance(self.context_slices, int)
                or self.context_slices < 1 or self.context_slices % 2 == 0):
            raise ModelError(f"preprocessing.context_slices must be an odd whole number >= 1, got {self.context_slices!r}")
        if not self.context_spacing_mm >= 0:
            raise ModelError(f"preprocessing.context_spacing_mm must be >= 0, got {self.context_spacing_mm!r}")
        if len(self.orientation) != 3:
            raise ModelError(f"preprocessing.orientation must be a 3-letter code such as 'LPS', got {self.orientation!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"unknown keys in preprocessing spec: {sorted(unknown)}")
        kw = dict(d)
        for k in ("spacing", "ct_window", "mr_percentiles"):
            if k in kw:
                kw[k] = tuple(float(v) for v in kw[k])
        if "context_spacing_mm" in kw:
            kw["context_spacing_mm"] = float(kw["context_spacing_mm"])
        return cls(**kw)

    def context_offset(self, slice_thickness_mm: float) -> int:
        """Slices between neighbouring context channels for a volume of this slice thickness."""
        if self.context_slices == 1 or self.context_spacing_mm <= 0 or not slice_thickness_mm > 0:
            return 1
        return max(1, int(round(self.context_spacing_mm / float(slice_thickness_mm))))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def context_indices(n_slices: int, start: int, stop: int, context_slices: int, offset: int) -> np.ndarray:
    """``[stop - start, context_slices]`` slice indices of the context of slices ``start..stop-1``.

    Row ``r`` holds ``k - h·offset, ..., k, ..., k + h·offset`` for ``k = start + r`` and
    ``h = context_slices // 2``, clamped to ``[0, n_slices - 1]`` (the edge slice repeats).
    """
    half = context_slices // 2
    k = np.arange(start, stop)[:, None] + offset * np.arange(-half, half + 1)[None, :]
    return np.clip(k, 0, n_slices - 1)


def intensity_bounds(volume: np.ndarray, spec: PreprocessSpec) -> tuple[float, float]:
    """Clip bounds for ``volume`` under ``spec`` (computed once per volume, not per chunk)."""
    if spec.modality == "CT":
        return float(spec.ct_window[0]), float(spec.ct_window[1])
    values = volume[volume != 0]
    if values.size == 0:
        values = volume.reshape(-1)
    # Subsample large volumes: percentiles of 2M voxels are stable and cheap.
    if values.size > 2_000_000:
        step = values.size // 2_000_000
        values = values[::step]
    lo, hi = np.percentile(values.astype(np.float32), spec.mr_percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalise_intensity(array: np.ndarray | torch.Tensor, bounds: tuple[float, float], *, inplace: bool = False):
    """Clip to ``bounds`` and scale linearly to [-1, 1]; float32, works on numpy or torch.

    ``inplace=True`` (torch float32 only) overwrites ``array`` instead of allocating four
    temporaries of its size; the arithmetic, and so every bit of the result, is the same.
    """
    lo, hi = bounds
    scale = 2.0 / (hi - lo)
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported
    if torch is not None and isinstance(array, torch.Tensor):
        if inplace and array.dtype == torch.float32:
            return array.clamp_(lo, hi).sub_(lo).mul_(scale).sub_(1.0)
        x = array.to(torch.float32).clamp(lo, hi)
        return (x - lo) * scale - 1.0
    x = np.clip(array.astype(np.float32, copy=False), lo, hi)
    return (x - lo) * np.float32(scale) - np.float32(1.0)


def inplane_size(shape_hw: Sequence[int], spacing_hw: Sequence[float], target_hw: Sequence[float]) -> tuple[int, int]:
    """Size of a slice of ``shape_hw`` pixels at ``spacing_hw`` mm when resampled to ``target_hw`` mm."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_hw, spacing_hw, target_hw))  # type: ignore[return-value]


def resample_inplane(slices: torch.Tensor, size_hw: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample ``[S, C, H, W]`` slices to ``size_hw`` keeping the field of view's outer edges aligned.

    ``align_corners=False`` maps pixel areas onto pixel areas, so resampling to the model grid
    and back returns to the exact input grid (the output keeps the input's geometry by
    construction). ``mode='nearest'`` is used for label maps at training time.
    """
    import torch.nn.functional as F

    size_hw = tuple(int(v) for v in size_hw)
    if tuple(slices.shape[-2:]) == size_hw:
        return slices
    if mode == "nearest":
        return F.interpolate(slices, size=size_hw, mode="nearest-exact")
    shrinking = any(n < o for n, o in zip(size_hw, slices.shape[-2:]))
    return F.interpolate(slices, size=size_hw, mode=mode, align_corners=False, antialias=shrinking)
