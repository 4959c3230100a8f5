"""Volume inference: the method-agnostic engine and compute-device selection."""

from .device import device_description, resolve_device
from .engine import OrganStats, SegmentationResult, segment_volume

__all__ = ["OrganStats", "SegmentationResult", "device_description", "resolve_device", "segment_volume"]
