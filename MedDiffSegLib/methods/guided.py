"""Organ-prompted guided latent diffusion (``guided``).

One model segments many organs: the organ prompt is a learned class embedding of the
denoiser, and each prompt yields a binary mask. Masks are diffused in the latent space of a
separate small mask autoencoder; the image latent from a trainable image encoder is
concatenated with the noisy mask latent; the denoiser predicts ``z0`` directly
(x0 parameterisation) and is trained with ``MSE(ẑ0, z0)``. For multi-step sampling the loop
converts each ``ẑ0`` to the implied noise for the (epsilon-mode) scheduler.

The shared latent machinery lives in :class:`MedDiffSegLib.methods.sdseg.LatentDiffusionSegmentation`
(networks) and :class:`MedDiffSegLib.methods.latent.LatentMaskMethod` (sampling).
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import register_method
from .sdseg import LatentDiffusionSegmentation, weighted_mean


@register_method
class GuidedLatentDiffusion(LatentDiffusionSegmentation):
    """Organ-prompted latent diffusion with x0 parameterisation."""

    name = "guided"
    summary = "organ-prompted latent diffusion predicting the mask latent"
    prediction_type = "sample"

    def denoiser_loss(self, z0, z_t, noise, prediction, alpha_bar, weights=None):
        x0_mse = F.mse_loss(prediction, z0) if weights is None else weighted_mean((prediction - z0).square(), weights)
        return {"loss": x0_mse, "x0_mse": x0_mse}
