"""Testable, Qt-free parts of the MedDiffSeg Slicer module.

``MedDiffSeg.py`` keeps the Slicer classes (module, parameter node, widget, logic, self-test) and
delegates here: exact volume-node <-> SimpleITK conversion (:mod:`.geometry`), building and showing
result nodes (:mod:`.nodes`), the worker process behind a small protocol (:mod:`.process`), its
JSON progress lines (:mod:`.progress`), one segmentation in this or a worker process
(:mod:`.segmentation`), the volume's modality and the models that fit it (:mod:`.modality`),
DICOM-SEG / file export of a result (:mod:`.dicomexport`), quality presets
(:mod:`.presets`), Python dependencies (:mod:`.dependencies`) and the model management of the panel
(:mod:`.models`). Nothing here imports ``qt`` or ``ctk``; torch is imported only by the in-process
segmentation (:func:`.segmentation.segmentInProcess`, for scripts) and the DICOM export, when called.
"""

from .presets import DEFAULT_PRESET, DEVICES, QUALITY_PRESETS, QualityPreset
from .progress import ProgressTracker, formatDuration, parseWorkerLine
from .segmentation import BackgroundSegmentation, MedDiffSegResult, SegmentOptions, buildResultNodes, segmentInProcess

__all__ = [
    "BackgroundSegmentation", "DEFAULT_PRESET", "DEVICES", "MedDiffSegResult", "ProgressTracker",
    "QUALITY_PRESETS", "QualityPreset", "SegmentOptions", "buildResultNodes", "formatDuration",
    "parseWorkerLine", "segmentInProcess",
]
