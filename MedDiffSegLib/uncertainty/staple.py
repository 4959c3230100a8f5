"""STAPLE fusion of binary samples with SimpleITK's real ``STAPLEImageFilter``.

Not a reweighted mean vote: the filter runs Warfield et al.'s expectation-maximisation,
estimating each sample's sensitivity and specificity and the per-voxel probability of the
hidden true segmentation jointly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError


@dataclass
class StapleResult:
    probability: np.ndarray  # float32, same shape as one sample
    sensitivity: tuple[float, ...]
    specificity: tuple[float, ...]
    iterations: int


def staple_fuse(binary_samples, *, foreground: int = 1, max_iterations: int | None = None,
                confidence_weight: float = 1.0, return_details: bool = False):
    """Fuse ``N`` binary segmentations into a foreground probability.

    ``binary_samples`` is an array ``[N, ...]`` (uint8 / bool) or an iterable of ``N`` same-shaped
    2D/3D arrays. An iterable is consumed one sample at a time, so a generator that unpacks each
    sample on demand keeps only SimpleITK's copies in memory, not a second ``[N, ...]`` array.

    Returns a float32 array of one sample's shape (or a :class:`StapleResult` with the
    estimated per-sample sensitivity and specificity when ``return_details``). Needs N >= 2.

    SimpleITK's STAPLE filter produces a 64-bit float image by design; it is cast to float32
    immediately and released, so the only float64 is inside the filter itself.

    Degenerate input (every sample identical, e.g. all empty) makes the EM's sensitivity or
    specificity undefined (the filter returns NaN); then the unanimous sample *is* the estimate
    and is returned directly.
    """
    if isinstance(binary_samples, np.ndarray) and binary_samples.ndim < 2:
        raise InputError(f"staple_fuse needs samples stacked as [N, ...], got shape {binary_samples.shape}")
    images: list[sitk.Image] = []
    first: np.ndarray | None = None
    unanimous = True
    for sample in binary_samples:
        sample = np.asarray(sample)
        if first is None and sample.ndim not in (2, 3):
            raise InputError(f"staple_fuse works on 2D or 3D samples, got shape {sample.shape}")
        if first is not None and sample.shape != first.shape:
            raise InputError(f"staple_fuse needs samples of one shape, got {first.shape} and {sample.shape}")
        binary = (sample == foreground) if sample.dtype != bool else sample
        binary = np.ascontiguousarray(binary, dtype=np.uint8)
        if first is None:
            first = binary
        elif unanimous:
            unanimous = np.array_equal(first, binary)
        images.append(sitk.GetImageFromArray(binary))
        del sample, binary
    n = len(images)
    if n < 2:
        raise InputError(f"STAPLE needs at least 2 samples to fuse, got {n}; use samples >= 2 or turn STAPLE off")
    if unanimous:
        prob = first.astype(np.float32)
        if return_details:
            return StapleResult(prob, (1.0,) * n, (1.0,) * n, 0)
        return prob
    del first
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1.0)
    f.SetConfidenceWeight(float(confidence_weight))
    if max_iterations is not None:
        f.SetMaximumIterations(int(max_iterations))
    out = f.Execute(images)
    del images
    out = sitk.Cast(out, sitk.sitkFloat32)  # the filter's output is float64; keep float32 from here on
    prob = sitk.GetArrayFromImage(out)
    del out
    np.nan_to_num(prob, copy=False, nan=0.0)
    np.clip(prob, 0.0, 1.0, out=prob)
    if return_details:
        return StapleResult(prob, tuple(f.GetSensitivity()), tuple(f.GetSpecificity()), int(f.GetElapsedIterations()))
    return prob
