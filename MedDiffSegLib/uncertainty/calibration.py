"""Temperature calibration of an organ's mean foreground probability.

A diffusion segmenter's mean probability is usually over-confident near the organ: voxels it
gets wrong still read 0.02 or 0.98. Temperature scaling (Guo et al., 2017) divides the logit by
one number per organ, ``p' = sigmoid(logit(p) / T)``, fitted by minimising the negative
log-likelihood of the truth. It is monotone and keeps 0.5 at 0.5, so it changes neither the
ranking of voxels (AUROC of an entropy map) nor the labels at the usual 0.5 threshold - only
what the probabilities *say*: the saved probability maps, the fractional DICOM-SEG, the entropy.

A package carries the fitted values in ``inference.calibration``::

    {"method": "temperature", "temperature": {"liver": 1.8, ...}, "fitted_on": "...", ...}

(organs it does not name keep T = 1). ``bench/fit_calibration.py`` fits them on the protocol's
*training* patients - never the test patients the scores come from.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ModelError

#: Probabilities are clipped to [EPS, 1 - EPS] before the logit: half a step of the 8-bit maps the
#: fitting reads, so that fitting and applying see the same logits for exact 0 and 1.
EPS = 0.5 / 255


def temperatures(inference: Mapping[str, Any], organ_names: Sequence[str], package_name: str = "?") -> list[float]:
    """Per-organ temperatures of a package's ``inference.calibration`` (1.0 for organs it does not name)."""
    cal = inference.get("calibration")
    if not cal:
        return [1.0] * len(organ_names)
    if not isinstance(cal, Mapping) or cal.get("method") != "temperature" or not isinstance(cal.get("temperature"), Mapping):
        raise ModelError(f"model {package_name!r}: inference.calibration must be "
                         '{"method": "temperature", "temperature": {organ: T, ...}}')
    out = []
    for name in organ_names:
        t = cal["temperature"].get(name, 1.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.05 <= t <= 20:
            raise ModelError(f"model {package_name!r}: calibration temperature of {name!r} must be a number in "
                             f"[0.05, 20], got {t!r}")
        out.append(float(t))
    return out


def apply_temperature(p, temperature):
    """``sigmoid(logit(clip(p)) / T)``; ``T`` a number, or per organ broadcast against ``p``.

    T = 1 returns ``p`` unchanged (not even clipped), so uncalibrated packages are bit-identical.
    """
    if isinstance(temperature, (int, float)) and float(temperature) == 1.0:
        return p
    if isinstance(p, torch.Tensor):
        t = torch.as_tensor(temperature, dtype=torch.float32, device=p.device)
        if bool((t == 1.0).all()):
            return p
        x = torch.logit(p.to(torch.float32).clamp(EPS, 1.0 - EPS))
        return torch.sigmoid(x / t)
    t = np.asarray(temperature, dtype=np.float32)
    if np.all(t == 1.0):
        return p
    x = np.clip(np.asarray(p, dtype=np.float32), EPS, 1.0 - EPS)
    x = np.log(x) - np.log1p(-x)
    return (1.0 / (1.0 + np.exp(-x / t))).astype(np.float32)


def fit_temperature(p: np.ndarray, target: np.ndarray, *, bounds: tuple[float, float] = (0.1, 20.0)) -> dict[str, float]:
    """The T that minimises the mean binary NLL of ``apply_temperature(p, T)`` against ``target``.

    A golden-section search on log T (the NLL is convex in 1/T for fixed logits). Returns
    ``{"temperature", "nll_before", "nll_after", "voxels"}``.
    """
    x = np.clip(np.asarray(p, dtype=np.float64).ravel(), EPS, 1.0 - EPS)
    y = np.asarray(target, dtype=bool).ravel()
    if x.shape != y.shape:
        raise ValueError(f"probabilities ({x.size}) and targets ({y.size}) differ in size")
    if x.size == 0:
        raise ValueError("no voxels to fit a temperature on")
    z = np.log(x) - np.log1p(-x)
    s = np.where(y, 1.0, -1.0)

    def nll(log_t: float) -> float:  # mean of log(1 + exp(-s z / T)), stable
        return float(np.mean(np.logaddexp(0.0, -s * z / math.exp(log_t))))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    log_t = (a + b) / 2
    return {"temperature": math.exp(log_t), "nll_before": nll(0.0), "nll_after": nll(log_t), "voxels": int(x.size)}
