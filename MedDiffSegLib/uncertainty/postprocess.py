"""Mask post-processing with SimpleITK."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def keep_largest_component(mask: np.ndarray, *, fully_connected: bool = False) -> np.ndarray:
    """Keep only the largest connected component of a binary ``mask`` (2D or 3D array).

    Uses ``ConnectedComponent`` then ``RelabelComponent`` (which sorts components by size, the
    largest becoming label 1). Connectivity is by faces (6 in 3D) unless ``fully_connected``
    (26 in 3D). Components are counted in voxels, so anisotropic spacing does not matter; ties
    in size keep the component ITK labelled first (deterministic). Returns a bool array.
    """
    m = np.asarray(mask)
    binary = np.ascontiguousarray(m != 0, dtype=np.uint8)
    if not binary.any():
        return binary.astype(bool)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(binary), fully_connected)
    relabelled = sitk.RelabelComponent(cc, 0, True)
    return sitk.GetArrayViewFromImage(relabelled) == 1
