"""Ensemble statistics over diffusion samples: mean, population variance and binary entropy.

All functions accept ``torch.Tensor`` or ``numpy.ndarray`` and compute in float32 (never
float64): probabilities are in [0, 1], so float32 sums over a few samples are exact enough.
"""

from __future__ import annotations

import numpy as np
import torch


def ensemble_mean_variance(probs, dim: int = 1):
    """Mean and *population* variance (divide by N, not N-1) of ``probs`` along ``dim``.

    Computed around the first sample (shifted two-pass): ``d = x - x[0]``, mean ``x[0] + mean(d)``,
    variance ``mean((d - mean(d))**2)``. This is numerically stable and exact in the case that
    matters for uncertainty maps: where all samples agree (or N = 1), ``d`` is exactly zero, so
    the variance is exactly 0 and the mean is exactly the common value - a plain ``sum / N``
    would not guarantee either in float32.
    Returns ``(mean, variance)`` of the same kind (torch or numpy) as the input, float32.
    """
    if isinstance(probs, torch.Tensor):
        x = probs.to(torch.float32)
        ref = x.narrow(dim, 0, 1)
        d = x - ref
        md = d.mean(dim=dim, keepdim=True)
        var = (d - md).square_().mean(dim=dim)
        return (ref + md).squeeze(dim), var
    x = np.asarray(probs).astype(np.float32, copy=False)
    ref = np.take(x, [0], axis=dim)
    d = x - ref
    md = d.mean(axis=dim, keepdims=True, dtype=np.float32)
    var = np.square(d - md).mean(axis=dim, dtype=np.float32)
    return np.squeeze(ref + md, axis=dim), var


def binary_entropy(p):
    """Entropy in bits of a Bernoulli(p) voxel: 0 where p is 0 or 1, 1 at p = 0.5 (float32)."""
    if isinstance(p, torch.Tensor):
        x = p.to(torch.float32).clamp(0.0, 1.0)
        q = 1.0 - x
        h = (0.0 - (torch.special.xlogy(x, x) + torch.special.xlogy(q, q))) / float(np.log(2.0))
        return h.clamp_(0.0, 1.0)
    x = np.clip(np.asarray(p, dtype=np.float32), np.float32(0), np.float32(1))
    q = np.float32(1) - x
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(x > 0, x * np.log2(np.where(x > 0, x, np.float32(1))), np.float32(0))
        t2 = np.where(q > 0, q * np.log2(np.where(q > 0, q, np.float32(1))), np.float32(0))
    return np.clip(np.float32(0) - (t1 + t2), np.float32(0), np.float32(1)).astype(np.float32, copy=False)


# -- compact storage of per-organ maps ------------------------------------------------------------
#: A mean probability is stored as round(p · 255): the resolution of an 8-bit fractional DICOM-SEG.
PROBABILITY_LEVELS = 255
#: A variance is stored as its standard deviation (at most 0.5 for values in [0, 1]) times 510, so
#: 255 steps of 1/510 ≈ 0.002 in standard deviation; the smallest non-zero variance kept is (1/510)².
STD_LEVELS = 510


def quantise_probability(p) -> np.ndarray:
    """uint8 ``round(p · 255)`` of probabilities (clipped to [0, 1]); torch or numpy in, numpy out."""
    if isinstance(p, torch.Tensor):
        return (p.to(torch.float32).clamp(0.0, 1.0) * PROBABILITY_LEVELS).round_().to(torch.uint8).cpu().numpy()
    x = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0) * np.float32(PROBABILITY_LEVELS)
    return np.rint(x).astype(np.uint8)


def dequantise_probability(q: np.ndarray) -> np.ndarray:
    """float32 probabilities ``q / 255`` of :func:`quantise_probability`'s codes (a new C-ordered array)."""
    p = np.array(q, dtype=np.float32, order="C")  # the one float32 allocation; scaled in place
    p *= np.float32(1.0 / PROBABILITY_LEVELS)
    return p


def quantise_variance(v) -> np.ndarray:
    """uint8 ``round(sqrt(v) · 510)`` of variances of [0, 1]-valued samples (at most 0.25)."""
    if isinstance(v, torch.Tensor):
        s = v.to(torch.float32).clamp(0.0, 0.25).sqrt_()
        return (s * STD_LEVELS).round_().clamp_(max=255).to(torch.uint8).cpu().numpy()
    s = np.sqrt(np.clip(np.asarray(v, dtype=np.float32), 0.0, 0.25))
    return np.rint(np.minimum(s * np.float32(STD_LEVELS), 255)).astype(np.uint8)


def dequantise_variance(q: np.ndarray) -> np.ndarray:
    """float32 variances ``(q / 510)²`` of :func:`quantise_variance`'s codes (0 stays exactly 0; a new
    C-ordered array)."""
    s = np.array(q, dtype=np.float32, order="C")
    s *= np.float32(1.0 / STD_LEVELS)
    return np.square(s, out=s)


# -- the uncertainty map as written to disk --------------------------------------------------------
#: Variances below this are written as 0: half a step of the per-organ maps' standard deviation
#: (1/510), i.e. what those maps store as 0 anyway (a standard deviation under 0.001 in probability).
STORAGE_VARIANCE_FLOOR = (0.5 / STD_LEVELS) ** 2
#: Mantissa bits kept when writing float32 maps: 10, float16's precision (relative error ≤ 2^-11)
#: with float32's range; readers still get float32 values.
STORAGE_MANTISSA_BITS = 10


def variance_for_storage(v: np.ndarray) -> np.ndarray:
    """A float32 copy of the variance map ``v`` made for compressed writing: values under
    :data:`STORAGE_VARIANCE_FLOOR` set to 0 and the rest rounded to :data:`STORAGE_MANTISSA_BITS`
    mantissa bits (relative error at most 2^-11 ≈ 0.05 %).

    Away from the organs the ensemble leaves a dust of variances around 1e-9..1e-7 in ~40 % of a
    CT's voxels; those random low bits are what made the gzip of the map slow (3.7 s and 74 MB for
    a 512×512×200 CT with 10 samples, against 0.2 s and 1.1 MB after this).
    """
    out = np.array(v, dtype=np.float32, order="C")  # the one copy; rounded in place
    small = out < np.float32(STORAGE_VARIANCE_FLOOR)  # decided on the exact values
    drop = 23 - STORAGE_MANTISSA_BITS
    bits = out.view(np.uint32)
    bits += np.uint32(1 << (drop - 1))  # round half up on the magnitude (the values are >= 0)
    bits &= np.uint32((0xFFFFFFFF >> drop) << drop)
    np.copyto(out, np.float32(0.0), where=small)
    return out
