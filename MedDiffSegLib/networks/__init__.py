"""Network building blocks shared by the methods."""

from .autoencoders import (
    DOWNSAMPLE,
    ConvBlock,
    ConvEncoder,
    ImageEncoder,
    MaskAutoencoder,
    MaskDecoder,
    ResBlock,
    group_norm,
    soft_dice_loss,
)
from .denoiser import LatentDenoiser

__all__ = [
    "DOWNSAMPLE",
    "ConvBlock",
    "ConvEncoder",
    "ImageEncoder",
    "LatentDenoiser",
    "MaskAutoencoder",
    "MaskDecoder",
    "ResBlock",
    "group_norm",
    "soft_dice_loss",
]
