"""Training: labelled volumes → 2D slice windows → staged training → an installable model package."""

from .data import LabelledVolume, SliceWindowSampler, load_labelled_volume
from .datasets import Dataset, make_dataset, read_dataset, read_label_table
from .trainer import TrainConfig, TrainingInterrupted, apply_overrides, train

__all__ = [
    "LabelledVolume", "SliceWindowSampler", "load_labelled_volume",
    "Dataset", "make_dataset", "read_dataset", "read_label_table",
    "TrainConfig", "TrainingInterrupted", "apply_overrides", "train",
]
