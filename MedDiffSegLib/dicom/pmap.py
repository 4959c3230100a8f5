"""The uncertainty map as a DICOM Parametric Map, in the source series' frame of reference.

MedDiffSeg's uncertainty is the variance, over the diffusion samples, of a voxel's foreground
probability. A probability is dimensionless, and so is its variance: the real-world value
mapping uses the UCUM unit ``1`` ("no units"), with slope 1 and intercept 0 on 32-bit float
pixel data, so a reader gets the variance itself (0 = all samples agree; at most 0.25, the
variance of a fair coin). One frame per source frame, each referencing its source instance;
a window of [0, max] is recommended for display so a viewer can overlay it on the image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError
from ._common import (CONTENT_CREATOR, MANUFACTURER, DicomExport, copy_extra_attributes, export_record, finite_or_error,
                      lo, quiet_highdicom, series_number_from)
from .source import SourceSeries, StrPath, align_to_grid, check_output_path, load_source_series, write_dataset_atomic

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
PMAP_SERIES_OFFSET = 2000
#: Largest possible variance of a probability (a value in [0, 1]).
MAX_PROBABILITY_VARIANCE = 0.25
UNIT_NO_UNITS = {"value": "1", "scheme_designator": "UCUM", "meaning": "no units"}


def variance_value_mapping(value_range: tuple[float, float]):
    """Real-world value mapping for a probability variance: identity, UCUM "1" (no units)."""
    from highdicom.pm import RealWorldValueMapping
    from highdicom.sr import CodedConcept

    return RealWorldValueMapping(
        lut_label="VARIANCE",
        lut_explanation=lo("variance of the foreground probability over the diffusion samples"),
        unit=CodedConcept(**UNIT_NO_UNITS),
        value_range=(float(value_range[0]), float(value_range[1])),
        slope=1.0,
        intercept=0.0,
    )


def build_parametric_map(
    uncertainty: sitk.Image,
    source: SourceSeries,
    *,
    model_name: str = MANUFACTURER,
    model_version: str = __version__,
    series_description: str | None = None,
    series_number: int | None = None,
    instance_number: int = 1,
    device_serial_number: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
):
    """Build the Parametric Map data set in memory (nothing is written). Returns ``(dataset, notes)``."""
    import highdicom as hd

    array = align_to_grid(uncertainty, source.grid, "the uncertainty map").astype(np.float32, copy=False)
    finite_or_error(array, "the uncertainty map")
    lo_v, hi_v = float(array.min()), float(array.max())
    if lo_v < 0:
        raise InputError(f"the uncertainty map has negative values (min {lo_v:.4g}); a variance is never negative")
    value_range = (0.0, max(MAX_PROBABILITY_VARIANCE, hi_v))
    pixel = np.ascontiguousarray(array[source.frames_to_slices()])
    first = source.ordered_datasets()[0]
    description = series_description if series_description else f"{MANUFACTURER} {model_name} uncertainty"
    width = hi_v if hi_v > 0 else MAX_PROBABILITY_VARIANCE
    try:
        with quiet_highdicom():
            pm = hd.pm.ParametricMap(
                source_images=source.ordered_datasets(),
                pixel_array=pixel,
                series_instance_uid=series_instance_uid or hd.UID(),
                series_number=series_number or series_number_from(first, PMAP_SERIES_OFFSET),
                sop_instance_uid=sop_instance_uid or hd.UID(),
                instance_number=instance_number,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=lo(model_name),
                software_versions=lo(__version__),
                device_serial_number=lo(device_serial_number or model_version or "1"),
                contains_recognizable_visual_features=False,
                real_world_value_mappings=[variance_value_mapping(value_range)],
                # A window narrower than 1 needs LINEAR_EXACT (PS3.3 C.11.2.1.2.1).
                voi_lut_transformations=[hd.VOILUTTransformation(
                    window_center=width / 2.0, window_width=width, window_explanation="UNCERTAINTY",
                    voi_lut_function="LINEAR_EXACT")],
                content_description=lo(f"{MANUFACTURER} uncertainty (probability variance)"),
                content_creator_name=CONTENT_CREATOR,
                content_label="UNCERTAINTY",
                series_description=lo(description),
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"the Parametric Map cannot be built from this source series: {exc}") from exc
    copy_extra_attributes(first, pm)
    if "Laterality" not in pm:
        # General Series Laterality is Type 2C (paired body parts without Frame Laterality): a
        # whole-volume map of no particular side, so present and empty.
        pm.Laterality = None
    return pm, list(source.notes)


def export_parametric_map(
    uncertainty: sitk.Image,
    source_files: StrPath | Sequence[StrPath],
    out_path: StrPath,
    *,
    model_name: str = MANUFACTURER,
    model_version: str = __version__,
    series_description: str | None = None,
    series_number: int | None = None,
    source_grid: sitk.Image | None = None,
) -> DicomExport:
    """Write ``uncertainty`` (variance of the probability) as a DICOM Parametric Map derived from ``source_files``.

    Same source/geometry rules and atomic writing as :func:`~MedDiffSegLib.dicom.export_dicom_seg`.
    """
    target = check_output_path(out_path)
    source = load_source_series(source_files, grid=source_grid)
    pm, notes = build_parametric_map(uncertainty, source, model_name=model_name, model_version=model_version,
                                     series_description=series_description, series_number=series_number)
    return export_record(pm, write_dataset_atomic(pm, target), notes=notes)
