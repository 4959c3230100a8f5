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
from .dts import ConditionalEncoder, DTSDenoiser, ReverseBoundaryAttention, SwinEncoder
from .medsegdiff import (
    AnchorSpatialAttention,
    ConditionUNet,
    DiffusionUNet,
    NeuralBandPassFilter,
    SpectralCrossAttention,
    SSFormer,
    spectral_affinity,
)
from .dit import ControlDiT, ControlledDiT, DiT, DiTBlock

__all__ = [
    "ConditionalEncoder",
    "DTSDenoiser",
    "ReverseBoundaryAttention",
    "SwinEncoder",
    "DOWNSAMPLE",
    "AnchorSpatialAttention",
    "ConditionUNet",
    "DiffusionUNet",
    "NeuralBandPassFilter",
    "SSFormer",
    "SpectralCrossAttention",
    "spectral_affinity",
    "ConvBlock",
    "ControlDiT",
    "ControlledDiT",
    "ConvEncoder",
    "DiT",
    "DiTBlock",
    "ImageEncoder",
    "LatentDenoiser",
    "MaskAutoencoder",
    "MaskDecoder",
    "ResBlock",
    "group_norm",
    "soft_dice_loss",
]
