"""Small convolutional encoders and the binary-mask autoencoder used by the latent methods.

Everything downsamples by 8 (three stride-2 stages). Widths are configurable and deliberately
narrow at full resolution: at inference the image encoder runs once per window and the mask
decoder once per window × organ × sample, so their full-resolution convolutions set the cost
of a whole-volume run on a CPU.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DOWNSAMPLE = 8


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(int(groups), int(channels)), int(channels), eps=1e-5)


class ConvBlock(nn.Sequential):
    """3×3 convolution (optionally strided) → GroupNorm → SiLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, norm_groups: int = 8):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            group_norm(out_ch, norm_groups),
            nn.SiLU(),
        )


class ResBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (pre-activation)."""

    def __init__(self, channels: int, norm_groups: int = 8):
        super().__init__()
        self.norm1 = group_norm(channels, norm_groups)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = group_norm(channels, norm_groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


def _check_widths(name: str, channels: Sequence[int], blocks: Sequence[int]) -> tuple[list[int], list[int]]:
    channels = [int(c) for c in channels]
    blocks = [int(b) for b in blocks]
    if len(channels) != 4 or min(channels) < 1:
        raise ValueError(f"{name}: channels must be 4 positive widths (full, /2, /4, /8 resolution), got {channels}")
    if len(blocks) != 3 or min(blocks) < 0:
        raise ValueError(f"{name}: blocks must be 3 non-negative counts (at /2, /4, /8), got {blocks}")
    return channels, blocks


class ConvEncoder(nn.Module):
    """``[B,in,H,W] -> [B,out,H/8,W/8]``: a full-resolution stem, three stride-2 stages, a 1×1 head.

    ``channels`` are the widths at full, /2, /4 and /8 resolution; ``blocks`` the number of
    residual blocks after each stride-2 stage.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (0, 1, 1),
        norm_groups: int = 8,
    ):
        super().__init__()
        channels, blocks = _check_widths("ConvEncoder", channels, blocks)
        self.stem = ConvBlock(in_channels, channels[0], 1, norm_groups)
        stages = []
        for i in range(3):
            layers: list[nn.Module] = [ConvBlock(channels[i], channels[i + 1], 2, norm_groups)]
            layers += [ResBlock(channels[i + 1], norm_groups) for _ in range(blocks[i])]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(group_norm(channels[3], norm_groups), nn.SiLU(), nn.Conv2d(channels[3], out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class ImageEncoder(ConvEncoder):
    """Trainable image encoder: a window ``[B,1,H,W]`` in [-1, 1] → image latent ``[B,C,H/8,W/8]``."""

    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (0, 1, 1),
        norm_groups: int = 8,
        in_channels: int = 1,
    ):
        super().__init__(in_channels, latent_channels, channels, blocks, norm_groups)


class MaskDecoder(nn.Module):
    """``[B,C,H/8,W/8] -> [B,1,H,W]`` logits: three (nearest ×2 upsample → 3×3 conv) stages.

    ``channels`` are the widths at /8, /4, /2 and full resolution; ``blocks`` the number of
    residual blocks at /8, /4 and /2 (none at full resolution, where they would cost most).
    """

    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int] = (64, 32, 16, 8),
        blocks: Sequence[int] = (1, 0, 0),
        norm_groups: int = 8,
    ):
        super().__init__()
        channels, blocks = _check_widths("MaskDecoder", channels, blocks)
        self.stem = ConvBlock(latent_channels, channels[0], 1, norm_groups)
        stages = []
        for i in range(3):
            layers: list[nn.Module] = [ResBlock(channels[i], norm_groups) for _ in range(blocks[i])]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), ConvBlock(channels[i], channels[i + 1], 1, norm_groups)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(channels[3], 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(z)))


class MaskAutoencoder(nn.Module):
    """Deterministic autoencoder for binary masks with a bounded latent.

    ``encode`` maps a mask ``[B,1,H,W]`` in {0, 1} to a latent ``[B,C,H/8,W/8]`` in [-1, 1]
    (tanh), so a diffusion model over it can clip its ``x0`` estimates to that range;
    ``decode`` maps a latent back to mask logits ``[B,1,H,W]``.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        encoder_channels: Sequence[int] = (8, 16, 32, 64),
        encoder_blocks: Sequence[int] = (0, 0, 1),
        decoder_channels: Sequence[int] = (64, 32, 16, 8),
        decoder_blocks: Sequence[int] = (1, 0, 0),
        norm_groups: int = 8,
    ):
        super().__init__()
        self.latent_channels = int(latent_channels)
        self.encoder = ConvEncoder(1, self.latent_channels, encoder_channels, encoder_blocks, norm_groups)
        self.decoder = MaskDecoder(self.latent_channels, decoder_channels, decoder_blocks, norm_groups)

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(masks.to(self.encoder.stem[0].weight.dtype) * 2 - 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits of ``masks``."""
        return self.decode(self.encode(masks))

    def loss(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """BCE + Dice of the reconstruction (weight decay is left to the optimiser).

        Soft masks (area fractions, any value strictly between 0 and 1) take the Dice with squared
        terms in the denominator (V-Net's form), which, like BCE, is smallest exactly when the
        reconstruction equals the fractions; the ordinary soft Dice would push them towards 0/1
        and lose the sub-pixel boundary they carry.
        """
        masks = masks.to(torch.float32)
        logits = self.forward(masks).to(torch.float32)
        bce = F.binary_cross_entropy_with_logits(logits, masks)
        soft = bool(((masks > 0) & (masks < 1)).any())
        dice = soft_dice_loss(logits, masks, squared=soft)
        return {"loss": bce + dice, "bce": bce, "dice": dice}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   squared: bool = False) -> torch.Tensor:
    """``1 − soft Dice`` of ``sigmoid(logits)`` against ``target``, pooled over the whole batch.

    Pooling over the batch keeps windows where the organ is absent from contributing a
    degenerate 0/0 term; ``smooth`` keeps the all-empty batch at loss 0 for an empty prediction.
    ``squared`` uses ``Σp² + Σt²`` as the denominator: its minimum is at ``p = t`` also for
    fractional targets.
    """
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    if squared:
        return 1 - (2 * inter + smooth) / ((p * p).sum() + (target * target).sum() + smooth)
    return 1 - (2 * inter + smooth) / (p.sum() + target.sum() + smooth)
