"""The latent denoiser: MONAI's ``DiffusionModelUNet`` with image-latent concatenation and an organ prompt."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LatentDenoiser(nn.Module):
    """``(z_t, t, image_latent, organ_ids) -> prediction`` with the shape of ``z_t``.

    The noisy mask latent and the image latent are concatenated on the channel axis; the organ
    prompt is a learned class embedding added to the timestep embedding
    (``num_class_embeds=num_organs``). The UNet halves the latent ``len(channels) − 1`` times,
    so the latent size must be divisible by :attr:`size_multiple`. ``zero_init=False`` replaces
    MONAI's zero initialisation of the residual/attention/output layers (see
    :meth:`reset_zero_initialised`).
    """

    def __init__(
        self,
        mask_latent_channels: int,
        image_latent_channels: int,
        num_organs: int,
        channels: Sequence[int] = (64, 128, 128),
        num_res_blocks: Sequence[int] | int = 1,
        attention_levels: Sequence[bool] = (False, False, True),
        norm_num_groups: int = 32,
        num_head_channels: int = 32,
        zero_init: bool = True,
    ):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        channels = [int(c) for c in channels]
        attention_levels = [bool(a) for a in attention_levels]
        if len(attention_levels) != len(channels):
            raise ValueError(f"attention_levels ({len(attention_levels)}) must have one entry per UNet level ({len(channels)})")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channels)
        self.size_multiple = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=int(mask_latent_channels) + int(image_latent_channels),
            out_channels=int(mask_latent_channels),
            num_res_blocks=[int(n) for n in num_res_blocks],
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=int(norm_num_groups),
            num_head_channels=int(num_head_channels),
            num_class_embeds=int(num_organs),
        )
        if not zero_init:
            self.reset_zero_initialised()

    def reset_zero_initialised(self) -> None:
        """Give MONAI's zero-initialised layers the ordinary PyTorch initialisation.

        MONAI zero-initialises the output convolution and the last layer of every residual and
        attention branch (a training-stability choice). An untrained UNet then predicts exactly 0
        whatever its input, timestep or organ prompt, so a randomly initialised test model would
        give identical samples for every seed and organ. Tiny test configs therefore switch it off.
        """
        for module in self.unet.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not bool(module.weight.any()):
                module.reset_parameters()

    def forward(
        self, z_t: torch.Tensor, t: torch.Tensor, image_latent: torch.Tensor, organ_ids: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([z_t, image_latent.to(z_t.dtype)], dim=1)
        return self.unet(x, timesteps=t, class_labels=organ_ids.long())
