"""Reading a DICOM-SEG back into a label map on the source series' voxel grid.

Each frame of the SEG is placed by its own Plane Position (Patient) onto the grid of the
source series (or, without a source, a grid spanned by the SEG's own frames), never by frame
order; its segment comes from its Segment Identification. Segment number ``n`` becomes label
``n``. Works for any conformant BINARY or FRACTIONAL SEG (dcmqi's, highdicom's, ours);
FRACTIONAL frames count as inside where the value is at least half the maximum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from ..errors import InputError
from .source import (_VOXEL_TOL, Grid, SourceFrame, StrPath, _fmt_vec, _functional_group, _grid_from_frames,
                     frame_geometry, load_source_series)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class SegmentInfo:
    number: int
    label: str
    category: dict[str, str]
    type: dict[str, str]
    algorithm_type: str
    algorithm_name: str | None = None
    color_rgb: tuple[int, int, int] | None = None
    voxels: int = 0


@dataclass
class DicomSegmentation:
    """A SEG read back: ``labels`` (segment number per voxel, 0 = none) on the grid, and its segments."""

    labels: sitk.Image
    segments: list[SegmentInfo]
    segmentation_type: str
    fractional_type: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _code(item: Dataset | None) -> dict[str, str]:
    if item is None:
        return {}
    return {"code": str(item.get("CodeValue", "")), "scheme": str(item.get("CodingSchemeDesignator", "")),
            "meaning": str(item.get("CodeMeaning", ""))}


def _segment_infos(ds: Dataset) -> list[SegmentInfo]:
    infos = []
    for item in ds.get("SegmentSequence", []):
        color = None
        lab = item.get("RecommendedDisplayCIELabValue", None)
        if lab is not None:
            try:
                from highdicom.color import CIELabColor

                color = tuple(int(c) for c in CIELabColor.from_dicom_value(tuple(int(v) for v in lab)).to_rgb())
            except Exception:  # a malformed colour should not keep the voxels from being read
                color = None
        algo = item.get("SegmentationAlgorithmIdentificationSequence", None)
        cat = item.get("SegmentedPropertyCategoryCodeSequence", None)
        typ = item.get("SegmentedPropertyTypeCodeSequence", None)
        infos.append(SegmentInfo(
            number=int(item.SegmentNumber), label=str(item.get("SegmentLabel", "")),
            category=_code(cat[0] if cat else None), type=_code(typ[0] if typ else None),
            algorithm_type=str(item.get("SegmentAlgorithmType", "")),
            algorithm_name=str(algo[0].get("AlgorithmName", "")) if algo else None,
            color_rgb=color,  # type: ignore[arg-type]
        ))
    return infos


def _frame_segment(ds: Dataset, frame: int) -> int:
    item = _functional_group(ds, frame, "SegmentIdentificationSequence")
    if item is None or "ReferencedSegmentNumber" not in item:
        raise InputError(f"DICOM-SEG frame {frame + 1} has no Referenced Segment Number")
    return int(item.ReferencedSegmentNumber)


def read_dicom_seg(
    seg_path: StrPath,
    source: StrPath | Sequence[StrPath] | sitk.Image | Grid | None = None,
    *,
    overlap: str = "error",
) -> DicomSegmentation:
    """Read the DICOM-SEG at ``seg_path`` as a label map (``sitk`` uint8/uint16, segment number per voxel).

    ``source``: the source series (folder, files, an image on its grid, or a :class:`Grid`); the
    label map then has exactly that grid. ``None``: a grid spanned by the SEG's frames (slices
    without any frame in between are filled with background; slices beyond the first and
    last frame are not known and not included).

    ``overlap``: segments overlapping in a voxel cannot share a label map: ``"error"``
    (default) raises :class:`InputError` naming them; ``"last"`` keeps the higher segment number.
    """
    if overlap not in ("error", "last"):
        raise ValueError(f"overlap must be 'error' or 'last', got {overlap!r}")
    shown = os.fspath(seg_path)
    p = Path(seg_path)
    if not p.is_file():
        raise InputError(f"{shown} does not exist or is not a file")
    try:
        ds = pydicom.dcmread(str(p))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{shown} cannot be read as DICOM: {exc}") from exc
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise InputError(f"{shown} is not a DICOM Segmentation (SOP Class {ds.get('SOPClassUID', 'missing')}, "
                         f"modality {ds.get('Modality', '?')})")
    seg_type = str(ds.get("SegmentationType", "BINARY"))
    if seg_type not in ("BINARY", "FRACTIONAL"):
        raise InputError(f"{shown}: segmentation type {seg_type} is not supported (BINARY or FRACTIONAL)")
    segments = _segment_infos(ds)
    if not segments:
        raise InputError(f"{shown} describes no segment")
    frames = frame_geometry(ds, shown) if int(ds.get("NumberOfFrames", 0) or 0) > 0 else []

    if isinstance(source, Grid):
        grid = source
    elif isinstance(source, sitk.Image):
        grid = Grid.of(source)
    elif source is not None:
        grid = load_source_series(source).grid
    elif frames:
        grid = _seg_own_grid(ds, frames, shown)
    else:
        raise InputError(f"{shown} has no frames and no source series was given: the grid is unknown")

    max_number = max(s.number for s in segments)
    labels = np.zeros(grid.shape_zyx, dtype=np.uint8 if max_number < 256 else np.uint16)
    if frames:
        pixels = ds.pixel_array
        if pixels.ndim == 2:
            pixels = pixels[None]
        if seg_type == "FRACTIONAL":
            threshold = int(ds.get("MaximumFractionalValue", 255)) / 2.0
            inside_frames = pixels >= threshold
        else:
            inside_frames = pixels.astype(bool, copy=False)
        ref = grid.matrix
        known = {s.number for s in segments}
        # Higher segment numbers last, so "last" keeps the higher number.
        frame_order = sorted(range(len(frames)), key=lambda f: _frame_segment(ds, f))
        for f in frame_order:
            fr = frames[f]
            number = _frame_segment(ds, f)
            if number not in known:
                raise InputError(f"{shown}: frame {f + 1} refers to segment {number}, which is not described")
            k = _slice_of(fr, grid, ref, shown, f)
            mask = inside_frames[f]
            if not mask.any():
                continue
            target = labels[k]
            if overlap == "error":
                clash = mask & (target != 0) & (target != number)
                if clash.any():
                    other = int(target[clash][0])
                    raise InputError(f"{shown}: segments {other} and {number} overlap ({int(clash.sum())} voxels on "
                                     "one slice); a label map cannot hold both (read with overlap='last')")
            target[mask] = number
    counts = np.bincount(labels.reshape(-1), minlength=max_number + 1)
    for s in segments:
        s.voxels = int(counts[s.number])
    return DicomSegmentation(
        labels=grid.image_from_array(labels), segments=segments, segmentation_type=seg_type,
        fractional_type=str(ds.get("SegmentationFractionalType", "")) or None,
        extras={"series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
                "number_of_frames": len(frames)},
    )


def _slice_of(fr: SourceFrame, grid: Grid, ref: np.ndarray, shown: str, f: int) -> int:
    if (np.abs(ref[:, 0] - fr.row_direction).max() > 1e-4 or np.abs(ref[:, 1] - fr.column_direction).max() > 1e-4):
        raise InputError(f"{shown}: frame {f + 1} is oriented {_fmt_vec(fr.row_direction + fr.column_direction, 4)}, "
                         "not along the source series' rows and columns")
    if (fr.columns, fr.rows) != grid.size[:2]:
        raise InputError(f"{shown}: frame {f + 1} is {fr.columns}×{fr.rows} pixels, the source grid "
                         f"{grid.size[0]}×{grid.size[1]}")
    index = grid.continuous_index(fr.position)
    k = int(round(index[2]))
    if np.any(np.abs(index - np.array([0.0, 0.0, k])) > _VOXEL_TOL) or not 0 <= k < grid.size[2]:
        raise InputError(f"{shown}: frame {f + 1} at {_fmt_vec(fr.position)} mm does not lie on a slice of the "
                         f"source series' grid (continuous index {_fmt_vec(index, 5)})")
    return k


def _seg_own_grid(ds: Dataset, frames: list[SourceFrame], shown: str) -> Grid:
    """The grid spanned by the SEG's frames: distinct positions, spacing from Spacing Between Slices."""
    unique: list[SourceFrame] = []
    seen: list[np.ndarray] = []
    for fr in frames:
        pos = np.asarray(fr.position)
        if not any(np.allclose(pos, s, atol=1e-3) for s in seen):
            seen.append(pos)
            unique.append(fr)
    measures = _functional_group(ds, 0, "PixelMeasuresSequence")
    between = measures.get("SpacingBetweenSlices", None) if measures is not None else None
    if len(unique) == 1 or between is None:
        return _grid_from_frames(unique, shown)  # evenly spaced frames only
    normal = np.cross(unique[0].row_direction, unique[0].column_direction)
    heights = np.array([np.dot(fr.position, normal) for fr in unique])
    first = unique[int(np.argmin(heights))]
    dz = abs(float(between))
    n = int(round((heights.max() - heights.min()) / dz)) + 1
    base = _grid_from_frames([first], shown)
    return Grid((base.size[0], base.size[1], n), (base.spacing[0], base.spacing[1], dz), base.origin, base.direction)
