"""DICOM in and out: SEG and Parametric Map writers, a SEG reader, and C-STORE to a PACS.

- :func:`export_dicom_seg`: a label map (label ``i`` = ``organs[i-1]``) on a DICOM series' grid
  -> a DICOM Segmentation (BINARY, or FRACTIONAL from per-organ mean probabilities).
- :func:`export_parametric_map`: the uncertainty (probability variance) map -> a DICOM
  Parametric Map in the same frame of reference.
- :func:`export_dicom`: both, built before either is written.
- :func:`read_dicom_seg`: a DICOM-SEG -> a label map on the source series' grid.
- :func:`send_files`: C-STORE files to a PACS, one status per instance.
- :func:`load_source_series`, :func:`align_to_grid`: the source series and its voxel grid.

Writers write atomically (temporary file, then rename). Errors a user can cause are
:class:`~MedDiffSegLib.errors.InputError`, :class:`~MedDiffSegLib.errors.ModelError`,
:class:`~MedDiffSegLib.errors.OutputError` or :class:`PacsError`, with messages that carry no
patient data.
"""

from ._common import DicomExport
from .export import build_dicom_outputs, export_dicom
from .pmap import PARAMETRIC_MAP_STORAGE, build_parametric_map, export_parametric_map
from .read import DicomSegmentation, SegmentInfo, read_dicom_seg
from .seg import SEGMENTATION_STORAGE, build_dicom_seg, export_dicom_seg
from .send import PacsError, StoreResult, send_files
from .source import Grid, SourceSeries, align_to_grid, load_source_series, write_dataset_atomic

__all__ = [
    "PARAMETRIC_MAP_STORAGE",
    "SEGMENTATION_STORAGE",
    "DicomExport",
    "DicomSegmentation",
    "Grid",
    "PacsError",
    "SegmentInfo",
    "SourceSeries",
    "StoreResult",
    "align_to_grid",
    "build_dicom_outputs",
    "build_dicom_seg",
    "build_parametric_map",
    "export_dicom",
    "export_dicom_seg",
    "export_parametric_map",
    "load_source_series",
    "read_dicom_seg",
    "send_files",
    "write_dataset_atomic",
]
