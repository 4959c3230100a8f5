"""Training: labelled volumes → 2D slice windows → staged training → an installable model package."""

from .data import LabelledVolume, SliceWindowSampler, load_labelled_volume
from .trainer import TrainConfig, train

__all__ = ["LabelledVolume", "SliceWindowSampler", "load_labelled_volume", "TrainConfig", "train"]
