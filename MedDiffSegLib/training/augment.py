"""On-the-fly augmentation of training windows (MONAI transforms).

Geometry (affine: rotation, scale, shear, translation) is applied identically to image and
mask (bilinear for the image, nearest for the mask); intensity scale/shift and contrast
(gamma) to the image only. The generator state comes from a numpy ``Generator`` so a run is
reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandScaleIntensityd, RandShiftIntensityd


def _pipeline() -> Compose:
    return Compose([
        RandAffined(keys=("image", "mask"), prob=0.7, rotate_range=(0.26,), scale_range=(0.15, 0.15),
                    shear_range=(0.05, 0.05), translate_range=(8, 8), mode=("bilinear", "nearest"),
                    padding_mode="border"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
    ])


_TRANSFORM = None


def augment_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``[B,1,H,W]`` images and binary masks independently per sample."""
    global _TRANSFORM
    if _TRANSFORM is None:
        _TRANSFORM = _pipeline()
    xs, ys = [], []
    for x, y in zip(images, masks):
        _TRANSFORM.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = _TRANSFORM({"image": x, "mask": y})
        xs.append(torch.as_tensor(out["image"]).float())
        ys.append((torch.as_tensor(out["mask"]) > 0.5).float())
    return torch.stack(xs), torch.stack(ys)
