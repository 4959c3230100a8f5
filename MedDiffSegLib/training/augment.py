"""On-the-fly augmentation of training windows (MONAI transforms).

Geometry (affine: rotation, scale, shear, translation) is applied identically to image and
mask (bilinear for the image, nearest for the mask); intensity scale/shift, contrast (gamma),
noise, blur and (MR) a smooth bias field to the image only, every channel of a window alike.
The generator state comes from a numpy ``Generator`` so a run is reproducible.

A training config's ``augmentation`` block tunes it (defaults in :data:`DEFAULTS`)::

    {"scale": 0.15,               # ± relative zoom: a spacing / field-of-view change
     "rotate": 0.26,              # ± radians
     "intensity_scale": 0.1, "intensity_shift": 0.1,   # in normalised units ([-1, 1] range)
     "gamma": [0.7, 1.5], "gamma_prob": 0.3,
     "noise_std": 0.0,            # Gaussian noise (probability 0.3 when > 0)
     "blur_prob": 0.0,            # Gaussian blur, sigma 0.5-1.2 pixels (thicker or softer slices)
     "bias_field_prob": 0.0,      # MR: a smooth multiplicative field (coil inhomogeneity)
     "organ_shift_hu": null,      # CT: [low, high] HU offset per labelled organ (contrast phase)
     "organ_shift": null,         # the same in normalised units (any modality)
     "organ_shift_prob": 0.0}

The organ shift needs the window's full label map, so the window sampler applies it
(:class:`~MedDiffSegLib.training.data.SliceWindowSampler`); the rest is here.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

DEFAULTS = {"scale": 0.15, "rotate": 0.26, "intensity_scale": 0.1, "intensity_shift": 0.1, "gamma": [0.7, 1.5],
            "gamma_prob": 0.3, "noise_std": 0.0, "blur_prob": 0.0, "bias_field_prob": 0.0,
            "organ_shift_hu": None, "organ_shift": None, "organ_shift_prob": 0.0}


def augmentation_settings(block: dict | None) -> dict:
    """The ``augmentation`` block with defaults filled in; unknown keys are an error."""
    block = dict(block or {})
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown augmentation settings {unknown}; known: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **block}


def _pipeline(a: dict, soft: bool = False) -> Compose:
    t = [
        RandAffined(keys=("image", "mask"), prob=0.7, rotate_range=(float(a["rotate"]),),
                    scale_range=(float(a["scale"]), float(a["scale"])),
                    shear_range=(0.05, 0.05), translate_range=(8, 8), mode=("bilinear", "bilinear" if soft else "nearest"),
                    padding_mode="border"),
    ]
    if a["bias_field_prob"] > 0:
        # The field multiplies intensities: apply it to [0, 2], not to [-1, 1] around zero.
        t.append(RandBiasFieldd(keys="image", prob=float(a["bias_field_prob"]), coeff_range=(0.0, 0.3), degree=3))
    t += [
        RandScaleIntensityd(keys="image", factors=float(a["intensity_scale"]), prob=0.5),
        RandShiftIntensityd(keys="image", offsets=float(a["intensity_shift"]), prob=0.5),
        RandAdjustContrastd(keys="image", gamma=tuple(float(g) for g in a["gamma"]), prob=float(a["gamma_prob"])),
    ]
    if a["blur_prob"] > 0:
        t.append(RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.2), sigma_y=(0.5, 1.2), prob=float(a["blur_prob"])))
    if a["noise_std"] > 0:
        t.append(RandGaussianNoised(keys="image", std=float(a["noise_std"]), prob=0.3))
    return Compose(t)


_TRANSFORMS: dict[str, Compose] = {}


def augment_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
                  settings: dict | None = None, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``[B,C,H,W]`` images and ``[B,1,H,W]`` masks independently per sample.

    Binary masks are moved with nearest neighbour and stay binary; ``soft`` masks (area fractions
    in [0, 1]) are interpolated bilinearly and stay fractions.
    """
    a = augmentation_settings(settings)
    key = json.dumps(a, sort_keys=True) + ("soft" if soft else "")
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = _pipeline(a, soft)
    transform = _TRANSFORMS[key]
    bias = a["bias_field_prob"] > 0
    xs, ys = [], []
    for x, y in zip(images, masks):
        transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = transform({"image": x + 1.0 if bias else x, "mask": y})
        img = torch.as_tensor(out["image"]).float()
        xs.append((img - 1.0).clamp(-1.0, 1.0) if bias else img)
        m = torch.as_tensor(out["mask"]).float()
        ys.append(m.clamp(0.0, 1.0) if soft else (m > 0.5).float())
    return torch.stack(xs), torch.stack(ys)
