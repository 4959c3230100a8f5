"""DICOM Segmentation (SEG) objects from a MedDiffSeg label map, with highdicom.

One segment per organ: segment number ``i`` is label ``i`` of the label map and describes
``organs[i - 1]`` (display name as the segment label, SNOMED CT segmented property category
and type, recommended display colour as CIELab from the organ's RGB, algorithm
identification). The object is derived from the source series: patient and study from the
source, the source's frame of reference, one frame per (segment, source frame) holding any
voxel (empty frames are omitted, as the standard allows), every source instance referenced.

``BINARY`` by default; ``FRACTIONAL`` (type ``PROBABILITY``, 255 = certain) when the per-organ
mean probabilities are given. An empty segmentation (no voxel of any organ) is refused unless
``allow_empty=True``: an empty SEG usually means a failed run, and several viewers cannot load
a SEG without frames; with ``allow_empty`` every segment is written with its (empty) frames.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError, ModelError
from ..registry.package import Organ
from ._common import (CONTENT_CREATOR, MANUFACTURER, DicomExport, copy_extra_attributes, export_record, finite_or_error,
                      lo, quiet_highdicom, series_number_from)
from .source import SourceSeries, StrPath, align_to_grid, check_output_path, load_source_series, write_dataset_atomic

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MAX_FRACTIONAL_VALUE = 255
SEG_SERIES_OFFSET = 1000


def coded_concept(code: Mapping[str, str], what: str):
    """A highdicom ``CodedConcept`` from a ``{"code", "scheme", "meaning"}`` dict (model.json style)."""
    from highdicom.sr import CodedConcept

    try:
        value, scheme, meaning = (str(code[k]).strip() for k in ("code", "scheme", "meaning"))
    except (KeyError, TypeError):
        raise ModelError(f"{what} must have 'code', 'scheme' and 'meaning', got {code!r}") from None
    if not (value and scheme and meaning):
        raise ModelError(f"{what} has an empty code, scheme or meaning: {code!r}")
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def algorithm_identification(model_name: str, model_version: str, parameters: Mapping[str, Any] | None = None):
    """Algorithm Identification: the model (name, version), family Artificial Intelligence, source MedDiffSeg."""
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    params = {lo(k): lo(str(v)) for k, v in (parameters or {}).items() if v is not None} or None
    return AlgorithmIdentificationSequence(
        name=lo(model_name), family=codes.cid7162.ArtificialIntelligence, version=lo(model_version),
        source=lo(f"{MANUFACTURER} {__version__}"), parameters=params,
    )


def segment_description(number: int, organ: Organ, algorithm):
    from highdicom.color import CIELabColor
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription

    what = f"organ {organ.name!r}"
    try:
        r, g, b = (int(c) for c in organ.color)
        if not all(0 <= c <= 255 for c in (r, g, b)):
            raise ValueError
    except (TypeError, ValueError):
        raise ModelError(f"{what} has colour {organ.color!r}; expected three integers 0..255") from None
    return SegmentDescription(
        segment_number=number,
        segment_label=lo(organ.display_name or organ.name),
        segmented_property_category=coded_concept(organ.category, f"{what}'s category"),
        segmented_property_type=coded_concept(organ.type, f"{what}'s type"),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=CIELabColor.from_rgb(r, g, b),
    )


def _label_array(labels: sitk.Image, source: SourceSeries, n_organs: int) -> np.ndarray:
    """The label map in the grid's order as unsigned integers; checks the label values."""
    array = align_to_grid(labels, source.grid, "the label map")
    if array.dtype.kind == "f":
        finite_or_error(array, "the label map")
        if not np.array_equal(array, np.round(array)):
            raise InputError("the label map holds fractional values; expected integer labels 0..n "
                             "(pass probabilities separately for a FRACTIONAL segmentation)")
    elif array.dtype.kind not in "iub":
        raise InputError(f"the label map has pixel type {labels.GetPixelIDTypeAsString()}; expected integer labels")
    lo_v, hi_v = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo_v < 0:
        raise InputError(f"the label map holds negative labels (min {lo_v}); expected 0 (background) and 1..n")
    if hi_v > n_organs:
        present = [int(v) for v in np.unique(array) if v > n_organs]
        raise InputError(f"the label map holds label(s) {present[:10]} but only {n_organs} organ(s) were given: "
                         "label i must describe the i-th organ")
    dtype = np.uint8 if n_organs < 256 else np.uint16
    return array.astype(dtype, copy=False)


def build_dicom_seg(
    labels: sitk.Image,
    source: SourceSeries,
    organs: Sequence[Organ],
    *,
    fractional_probabilities: Sequence[sitk.Image] | None = None,
    model_name: str = MANUFACTURER,
    model_version: str = __version__,
    series_description: str | None = None,
    series_number: int | None = None,
    instance_number: int = 1,
    algorithm_parameters: Mapping[str, Any] | None = None,
    device_serial_number: str | None = None,
    allow_empty: bool = False,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
):
    """Build the SEG data set in memory (nothing is written). Returns ``(dataset, segments, notes)``.

    ``segments``: per organ ``{"number", "name", "label", "voxels"}``; ``notes``: source
    attributes that were filled in and empty segments.
    """
    import highdicom as hd
    from highdicom.seg import SegmentationFractionalTypeValues, SegmentationTypeValues

    organs = list(organs)
    if not organs:
        raise ModelError("no organs given: each label 1..n needs an organ to describe its segment")
    if len(organs) > 65535:
        raise ModelError("at most 65535 segments fit a DICOM-SEG")
    notes = list(source.notes)
    label_array = _label_array(labels, source, len(organs))
    counts = np.bincount(label_array.reshape(-1), minlength=len(organs) + 1)

    algorithm = algorithm_identification(model_name, model_version, algorithm_parameters)
    descriptions = [segment_description(i, organ, algorithm) for i, organ in enumerate(organs, start=1)]
    segments = [{"number": i, "name": o.name, "label": o.display_name, "voxels": int(counts[i])}
                for i, o in enumerate(organs, start=1)]
    for s in segments:
        if s["voxels"] == 0:
            notes.append(f"segment {s['number']} ({s['label']}) is empty")

    order = source.frames_to_slices()
    fractional = fractional_probabilities is not None
    if fractional:
        # A Sequence is indexed one organ at a time (the engine builds each map on access); anything else is listed.
        probs = fractional_probabilities if isinstance(fractional_probabilities, Sequence) else list(fractional_probabilities)
        if len(probs) != len(organs):
            raise InputError(f"{len(probs)} probability map(s) for {len(organs)} organ(s): give one per organ, in label order")
        pixel = np.empty((len(order), *source.grid.shape_zyx[1:], len(organs)), dtype=np.float32)
        for s, (img, organ) in enumerate(zip(probs, organs)):
            what = f"the probability map of {organ.name}"
            arr = align_to_grid(img, source.grid, what).astype(np.float32, copy=False)
            finite_or_error(arr, what)
            if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
                raise InputError(f"{what} has values from {float(arr.min()):.4g} to {float(arr.max()):.4g}; "
                                 "probabilities must lie in [0, 1]")
            pixel[..., s] = np.clip(arr, 0.0, 1.0)[order]
            segments[s]["voxels_nonzero_probability"] = int(np.count_nonzero(np.round(arr * MAX_FRACTIONAL_VALUE)))
        empty = not np.any(np.round(pixel * MAX_FRACTIONAL_VALUE))
    else:
        pixel = label_array[order]
        empty = not counts[1:].any()
    if empty and not allow_empty:
        raise InputError("the segmentation is empty (no voxel belongs to any organ); nothing to export. "
                         "Check the segmentation, or allow an empty DICOM-SEG explicitly (--allow-empty)")
    if empty:
        notes.append("the segmentation is empty: every segment is written with empty frames")

    first = source.ordered_datasets()[0]
    description = series_description if series_description else f"{MANUFACTURER} {model_name}"
    kwargs: dict[str, Any] = {}
    if fractional:
        kwargs.update(fractional_type=SegmentationFractionalTypeValues.PROBABILITY,
                      max_fractional_value=MAX_FRACTIONAL_VALUE)
    try:
        with quiet_highdicom():
            seg = hd.seg.Segmentation(
                source_images=source.ordered_datasets(),
                pixel_array=pixel,
                segmentation_type=SegmentationTypeValues.FRACTIONAL if fractional else SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=series_instance_uid or hd.UID(),
                series_number=series_number or series_number_from(first, SEG_SERIES_OFFSET),
                sop_instance_uid=sop_instance_uid or hd.UID(),
                instance_number=instance_number,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=lo(model_name),
                software_versions=lo(__version__),
                device_serial_number=lo(device_serial_number or model_version or "1"),
                content_description=lo(f"{MANUFACTURER} segmentation"),
                content_creator_name=CONTENT_CREATOR,
                content_label="MEDDIFFSEG",
                series_description=lo(description),
                omit_empty_frames=not empty,
                **kwargs,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"the DICOM-SEG cannot be built from this source series: {exc}") from exc
    copy_extra_attributes(first, seg)
    return seg, segments, notes


def export_dicom_seg(
    labels: sitk.Image,
    source_files: StrPath | Sequence[StrPath],
    organs: Sequence[Organ],
    out_path: StrPath,
    *,
    fractional_probabilities: Sequence[sitk.Image] | None = None,
    model_name: str = MANUFACTURER,
    model_version: str = __version__,
    series_description: str | None = None,
    series_number: int | None = None,
    algorithm_parameters: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
    source_grid: sitk.Image | None = None,
) -> DicomExport:
    """Write a DICOM-SEG of ``labels`` (label ``i`` = ``organs[i-1]``) derived from ``source_files``.

    ``labels``: an integer label map on the source series' voxel grid (the same size, spacing,
    origin and direction as the series read with :func:`~MedDiffSegLib.io.read_dicom_series`;
    the same grid with permuted/flipped axes is accepted). ``source_files``: the folder of the
    series or its files (any order; frames are matched by physical position).
    ``fractional_probabilities``: one mean-probability image per organ for a FRACTIONAL SEG.
    ``model_name``/``model_version``: the algorithm identification. ``source_grid``: the series
    image when already read (saves re-reading a folder's pixel data).

    The file is written atomically (temporary file, then rename): ``out_path`` is complete or
    untouched. Raises :class:`InputError` (geometry mismatch, several series, unusable source,
    empty segmentation), :class:`ModelError` (bad organ codes) or :class:`OutputError`.
    """
    target = check_output_path(out_path)
    source = load_source_series(source_files, grid=source_grid)
    seg, segments, notes = build_dicom_seg(
        labels, source, organs, fractional_probabilities=fractional_probabilities, model_name=model_name,
        model_version=model_version, series_description=series_description, series_number=series_number,
        algorithm_parameters=algorithm_parameters, allow_empty=allow_empty,
    )
    return export_record(seg, write_dataset_atomic(seg, target), segments, notes)

