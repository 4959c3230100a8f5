"""Uncertainty from an ensemble of diffusion samples: mean/variance/entropy, STAPLE, post-processing."""

from .ensemble import binary_entropy, ensemble_mean_variance
from .postprocess import keep_largest_component
from .staple import StapleResult, staple_fuse

__all__ = ["binary_entropy", "ensemble_mean_variance", "keep_largest_component", "staple_fuse", "StapleResult"]
