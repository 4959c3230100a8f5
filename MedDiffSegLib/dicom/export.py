"""SEG and Parametric Map together: both built in memory first, then both written, or neither."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import SimpleITK as sitk

from .. import __version__
from ..errors import OutputError
from ..registry.package import Organ
from ._common import MANUFACTURER, DicomExport, export_record
from .pmap import build_parametric_map
from .seg import build_dicom_seg
from .source import SourceSeries, StrPath, check_output_path, load_source_series, write_dataset_atomic


def build_dicom_outputs(
    labels: sitk.Image,
    source: SourceSeries,
    organs: Sequence[Organ],
    *,
    uncertainty: sitk.Image | None = None,
    fractional_probabilities: Sequence[sitk.Image] | None = None,
    model_name: str = MANUFACTURER,
    model_version: str = __version__,
    series_description: str | None = None,
    algorithm_parameters: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
):
    """Build the SEG (and, with ``uncertainty``, the Parametric Map) in memory.

    Returns ``(seg, segments, pmap_or_None, notes)``. Every check (geometry, labels, organ codes,
    empty segmentation) happens here, before anything is written.
    """
    seg, segments, notes = build_dicom_seg(
        labels, source, organs, fractional_probabilities=fractional_probabilities, model_name=model_name,
        model_version=model_version, series_description=series_description,
        algorithm_parameters=algorithm_parameters, allow_empty=allow_empty,
    )
    pmap = None
    if uncertainty is not None:
        pm_description = f"{series_description} uncertainty" if series_description else None
        pmap, _ = build_parametric_map(uncertainty, source, model_name=model_name, model_version=model_version,
                                       series_description=pm_description)
    return seg, segments, pmap, notes


def export_dicom(
    labels: sitk.Image,
    source_files: StrPath | Sequence[StrPath],
    organs: Sequence[Organ],
    seg_path: StrPath,
    *,
    uncertainty: sitk.Image | None = None,
    pmap_path: StrPath | None = None,
    fractional_probabilities: Sequence[sitk.Image] | None = None,
    model_name: str = MANUFACTURER,
    model_version: str = __version__,
    series_description: str | None = None,
    algorithm_parameters: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
    source_grid: sitk.Image | None = None,
) -> list[DicomExport]:
    """Write the DICOM-SEG (and the uncertainty Parametric Map when ``uncertainty`` and ``pmap_path`` are
    given) derived from ``source_files``. Both are built before either is written; if the second
    write fails the first file is removed, so a failure leaves neither behind.
    """
    if (uncertainty is None) != (pmap_path is None):
        raise ValueError("uncertainty and pmap_path go together")
    seg_target = check_output_path(seg_path)
    pm_target = check_output_path(pmap_path) if pmap_path is not None else None
    if pm_target is not None and os.path.abspath(seg_target) == os.path.abspath(pm_target):
        raise OutputError(f"the DICOM-SEG and the Parametric Map would both be written to {seg_target}")
    source = load_source_series(source_files, grid=source_grid)
    seg, segments, pmap, notes = build_dicom_outputs(
        labels, source, organs, uncertainty=uncertainty, fractional_probabilities=fractional_probabilities,
        model_name=model_name, model_version=model_version, series_description=series_description,
        algorithm_parameters=algorithm_parameters, allow_empty=allow_empty,
    )
    written = [export_record(seg, write_dataset_atomic(seg, seg_target), segments, notes)]
    if pmap is not None and pm_target is not None:
        try:
            written.append(export_record(pmap, write_dataset_atomic(pmap, pm_target), notes=source.notes))
        except BaseException:
            try:
                seg_target.unlink()
            except OSError:
                pass
            raise
    return written
