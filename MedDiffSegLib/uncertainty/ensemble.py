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
