"""The source image series a DICOM-SEG or Parametric Map is derived from, and its voxel grid.

A derived object must say, frame by frame, which source frame it lies on, and carry the
source's patient, study and frame-of-reference identity. This module

- loads the source series' headers (pixel data is never needed) from a folder (checked with
  :func:`~MedDiffSegLib.io.read_dicom_series`: one series, a regular grid) or from a list of
  files (Slicer passes the files of a loaded volume), single-frame or one enhanced multi-frame;
- fills the identifying attributes the standard lets a derived object fill when the source
  left them empty (see :func:`_repair_headers`), and refuses, with a clear error, sources
  whose geometry attributes are missing;
- maps every source frame to a slice of the series' voxel grid **by its physical position**
  (Image Position (Patient) projected onto the grid), never by file order;
- checks that a label map (or a probability/uncertainty map) lies on that grid and returns its
  voxels in the grid's order. The same voxel grid stored with permuted or flipped axes (a NIfTI
  written in RAS order, say) is accepted and mapped exactly by transposes and flips; anything
  else is refused, naming what differs (size, spacing, origin, direction).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from ..errors import InputError, OutputError
from ..io.volume import array_view, pseudo_filesystem, publish_file

StrPath = str | os.PathLike

# Two positions agree when they differ by less than this fraction of a voxel.
_VOXEL_TOL = 0.01
# Direction cosines agree within this.
_DIRECTION_TOL = 1e-4
# Relative tolerance on spacings.
_SPACING_RTOL = 1e-4
_SPACING_ATOL_MM = 1e-4

# Root for UIDs derived deterministically from a source's identity (pydicom's; see _derived_uid).
_UID_PREFIX = pydicom.uid.PYDICOM_ROOT_UID


def _fmt_vec(v: Sequence[float], digits: int = 6) -> str:
    return "(" + ", ".join(f"{float(x):.{digits}g}" for x in v) + ")"


def _size_text(size: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in size)


# ---- the voxel grid -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid in ITK's LPS patient coordinates (the geometry of a ``SimpleITK.Image``).

    ``direction`` is the row-major 3×3 matrix whose columns are the directions of the image axes
    i, j, k (for a DICOM series: the row direction, the column direction and the slice normal).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got {image.GetDimension()}D (size {_size_text(image.GetSize())})")
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))  # type: ignore[arg-type]

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    def continuous_index(self, point: Sequence[float]) -> np.ndarray:
        """Continuous (i, j, k) index of a physical point."""
        offset = np.asarray(point, dtype=np.float64) - np.asarray(self.origin)
        return np.linalg.solve(self.matrix, offset) / np.asarray(self.spacing)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array_zyx: np.ndarray) -> sitk.Image:
        return self.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array_zyx), isVector=False))


def align_to_grid(image: sitk.Image, grid: Grid, what: str) -> np.ndarray:
    """``image``'s voxels as a ``[k, j, i]`` array in ``grid``'s order; raises unless it is the same grid.

    The same set of voxel centres with permuted or flipped axes is accepted (mapped exactly,
    without interpolation). Otherwise :class:`InputError` names every difference: size,
    spacing, origin, direction.
    """
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}D (size {_size_text(image.GetSize())}); "
                         f"expected a 3D image on the DICOM series' grid ({_size_text(grid.size)})")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image")
    src = Grid.of(image)
    ref = grid.matrix
    cols = src.matrix
    # For each axis a of the image: the grid axis p[a] it runs along and whether it runs backwards.
    perm: list[int] = []
    flip: list[bool] = []
    for a in range(3):
        dots = ref.T @ cols[:, a]
        p = int(np.argmax(np.abs(dots)))
        if abs(abs(dots[p]) - 1.0) > _DIRECTION_TOL or p in perm:
            perm = []
            break
        perm.append(p)
        flip.append(bool(dots[p] < 0))

    problems: list[str] = []
    if not perm:
        problems.append(f"direction differs: {what} has axis directions {_fmt_vec(src.direction, 4)}, "
                        f"the series {_fmt_vec(grid.direction, 4)} (not the same axes, even permuted or flipped)")
        # Compare the rest axis by axis, as if the axes were the same.
        perm, flip = [0, 1, 2], [False, False, False]
    size_in_grid_order = [0, 0, 0]
    spacing_in_grid_order = [0.0, 0.0, 0.0]
    for a in range(3):
        size_in_grid_order[perm[a]] = src.size[a]
        spacing_in_grid_order[perm[a]] = src.spacing[a]
    if tuple(size_in_grid_order) != grid.size:
        problems.append(f"size differs: {what} is {_size_text(src.size)} voxels, the series {_size_text(grid.size)}")
    if not np.allclose(spacing_in_grid_order, grid.spacing, rtol=_SPACING_RTOL, atol=_SPACING_ATOL_MM):
        problems.append(f"spacing differs: {what} has {_fmt_vec(src.spacing)} mm, the series {_fmt_vec(grid.spacing)} mm")
    if not problems:
        # The image's first voxel must be the grid's corner voxel that its flips point to.
        corner = [0, 0, 0]
        for a in range(3):
            corner[perm[a]] = grid.size[perm[a]] - 1 if flip[a] else 0
        expected = np.asarray(grid.origin) + grid.matrix @ (np.asarray(corner) * np.asarray(grid.spacing))
        offset = np.asarray(src.origin) - expected
        if np.any(np.abs(grid.matrix.T @ offset) > _VOXEL_TOL * np.asarray(grid.spacing)):
            problems.append(
                f"origin differs: {what}'s first voxel is at {_fmt_vec(src.origin)} mm, the series' matching "
                f"corner at {_fmt_vec(expected)} mm (off by {float(np.linalg.norm(offset)):.4g} mm)")
    elif not np.allclose(src.origin, grid.origin, atol=_VOXEL_TOL * min(grid.spacing)):
        problems.append(f"origin differs: {what} starts at {_fmt_vec(src.origin)} mm, the series at {_fmt_vec(grid.origin)} mm")
    if problems:
        raise InputError(f"{what} does not lie on the DICOM series' voxel grid: " + "; ".join(problems)
                         + ". It must have the series' exact geometry (as 'meddiffseg segment' writes it)")

    array = array_view(image)  # [k, j, i] of the image = numpy axes 2 - a; holds the image (may be returned as is)
    flips = tuple(2 - a for a in range(3) if flip[a])
    if flips:
        array = np.flip(array, flips)
    # numpy axis of the output for grid axis g is 2 - g; it comes from image axis a with perm[a] = g.
    source_axis_for_output = [2 - perm.index(2 - n) for n in range(3)]
    return np.ascontiguousarray(np.transpose(array, source_axis_for_output))


# ---- headers ------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _derived_uid(kind: str, *parts: str) -> str:
    """A UID derived deterministically from ``parts``: the same source always gets the same one."""
    return str(pydicom.uid.generate_uid(prefix=_UID_PREFIX, entropy_srcs=[kind, *parts]))


def _repair_headers(datasets: list[Dataset], names: list[str]) -> list[str]:
    """Fill identifying attributes a source left empty, where the standard allows; return notes.

    - SOP Class/Instance UID (Type 1): from the file meta information (Media Storage SOP
      Class/Instance UID), which identify the same object.
    - Study/Series Instance UID (Type 1): when every file leaves one empty (some anonymisers
      blank them), a UID derived deterministically from the Frame of Reference UID and the
      source instance UIDs, so every object derived from the same source lands in the same
      study and references the same series.
    - Specific Character Set present but empty: removed (it then means the default repertoire,
      which is what an empty value meant).

    Attributes that fix the geometry (Image Position/Orientation (Patient), Pixel Spacing,
    Rows, Columns, Frame of Reference UID) are never invented: their absence is an error.
    """
    notes: list[str] = []
    for ds, name in zip(datasets, names):
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not _text(ds, keyword):
                value = _text(meta, meta_keyword) if meta is not None else ""
                if not value:
                    raise InputError(f"source DICOM file {name} has no {keyword} (neither in the data set nor "
                                     f"as {meta_keyword} in its file meta information): it cannot be referenced")
                setattr(ds, keyword, value)
                if keyword not in {n.split(" ")[0] for n in notes}:
                    notes.append(f"{keyword} filled from the file meta information ({meta_keyword})")
        if "SpecificCharacterSet" in ds and not _text(ds, "SpecificCharacterSet"):
            del ds.SpecificCharacterSet
    for keyword in ("FrameOfReferenceUID",):
        missing = [n for ds, n in zip(datasets, names) if not _text(ds, keyword)]
        if missing:
            raise InputError(f"source DICOM file {missing[0]} has no {keyword}: a segmentation cannot be tied to "
                             "the image's patient coordinates without it")
    sop_uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(sop_uids)) != len(sop_uids):
        raise InputError("the source files do not have distinct SOP Instance UIDs (the same instance twice?)")
    for keyword, kind in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series")):
        values = {_text(ds, keyword) for ds in datasets}
        if values == {""}:
            uid = _derived_uid(kind, _text(datasets[0], "FrameOfReferenceUID"), *sorted(sop_uids))
            for ds in datasets:
                setattr(ds, keyword, uid)
            notes.append(f"{keyword} is empty in the source; derived {uid} from its instance UIDs")
        elif len(values) > 1:
            shown = ", ".join(sorted(v or "(empty)" for v in values))
            raise InputError(f"the source files belong to several {kind}s ({keyword}: {shown}); "
                             "pass the files of one series")
    return notes


def _seq_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword, None)
    return seq[0] if seq else None


def _functional_group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """Item of functional-group sequence ``keyword`` for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame < len(per_frame):
        item = _seq_item(per_frame[frame], keyword)
        if item is not None:
            return item
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    if shared:
        return _seq_item(shared[0], keyword)
    return None


@dataclass(frozen=True)
class SourceFrame:
    """One frame of the source: which file/data set, which frame in it (1-based, 0 = single-frame)."""

    dataset_index: int
    frame_number: int
    position: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM orders it
    rows: int
    columns: int


def frame_geometry(ds: Dataset, name: str) -> list[SourceFrame]:
    """Position, orientation and pixel spacing of every frame of a data set (single- or multi-frame)."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    rows, columns = ds.get("Rows", None), ds.get("Columns", None)
    if rows is None or columns is None:
        raise InputError(f"source DICOM file {name} has no Rows/Columns: it is not an image")
    frames = []
    for f in range(n_frames):
        if enhanced:
            pos_item = _functional_group(ds, f, "PlanePositionSequence")
            ori_item = _functional_group(ds, f, "PlaneOrientationSequence")
            pix_item = _functional_group(ds, f, "PixelMeasuresSequence")
            position = pos_item.get("ImagePositionPatient") if pos_item is not None else None
            orientation = ori_item.get("ImageOrientationPatient") if ori_item is not None else None
            spacing = pix_item.get("PixelSpacing") if pix_item is not None else None
        else:
            position = ds.get("ImagePositionPatient", None)
            orientation = ds.get("ImageOrientationPatient", None)
            spacing = ds.get("PixelSpacing", None)
        missing = [k for k, v in (("Image Position (Patient)", position), ("Image Orientation (Patient)", orientation),
                                  ("Pixel Spacing", spacing)) if v is None or len(v) == 0]
        if missing:
            where = f" (frame {f + 1})" if n_frames > 1 else ""
            raise InputError(f"source DICOM file {name}{where} lacks {', '.join(missing)}: without it the "
                             "segmentation cannot be placed on the image")
        frames.append(SourceFrame(
            dataset_index=-1, frame_number=f + 1 if n_frames > 1 or enhanced else 0,
            position=tuple(float(v) for v in position),  # type: ignore[arg-type]
            row_direction=tuple(float(v) for v in orientation[:3]),  # type: ignore[arg-type,index]
            column_direction=tuple(float(v) for v in orientation[3:6]),  # type: ignore[arg-type,index]
            pixel_spacing=(float(spacing[0]), float(spacing[1])),  # type: ignore[index]
            rows=int(rows), columns=int(columns),
        ))
    return frames


def _grid_from_frames(frames: list[SourceFrame], shown: str) -> Grid:
    """The regular grid the frames form (checked as :func:`read_dicom_series` checks a series)."""
    first = frames[0]
    row = np.asarray(first.row_direction)
    col = np.asarray(first.column_direction)
    normal = np.cross(row, col)
    for fr in frames:
        if (np.abs(np.asarray(fr.row_direction) - row).max() > _DIRECTION_TOL
                or np.abs(np.asarray(fr.column_direction) - col).max() > _DIRECTION_TOL):
            raise InputError(f"{shown}: the source frames have different orientations; they do not form one volume")
        if (fr.rows, fr.columns) != (first.rows, first.columns) or not np.allclose(fr.pixel_spacing, first.pixel_spacing):
            raise InputError(f"{shown}: the source frames have different sizes or pixel spacings")
    heights = np.array([np.dot(fr.position, normal) for fr in frames])
    order = np.argsort(heights, kind="stable")
    heights = heights[order]
    if len(frames) > 1:
        gaps = np.diff(heights)
        if gaps.min() < 1e-3:
            raise InputError(f"{shown}: several source frames lie at the same position")
        dz = float(np.median(gaps))
        if np.abs(gaps - dz).max() > max(0.01, 0.1 * dz):
            raise InputError(f"{shown}: the source frames are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm)")
    else:
        dz = 1.0
    origin = frames[int(order[0])].position
    direction = tuple(np.stack([row, col, normal], axis=1).reshape(-1).tolist())
    # DICOM Pixel Spacing is (row spacing = along a column, column spacing = along a row).
    spacing = (first.pixel_spacing[1], first.pixel_spacing[0], dz)
    return Grid((first.columns, first.rows, len(frames)), spacing, tuple(origin), direction)  # type: ignore[arg-type]


# ---- the source series --------------------------------------------------------------------------


@dataclass
class SourceSeries:
    """The source series: header data sets (repaired copies), its grid, and each grid slice's frame."""

    files: list[str]
    datasets: list[Dataset]
    grid: Grid
    slice_frames: list[SourceFrame]  # slice_frames[k] is the source frame at grid slice k
    notes: list[str] = field(default_factory=list)  # attributes filled in (see _repair_headers)

    @property
    def is_multiframe(self) -> bool:
        return len(self.datasets) == 1 and self.slice_frames[0].frame_number > 0

    def ordered_datasets(self) -> list[Dataset]:
        """Source data sets in slice order (single-frame series) or the one multi-frame data set."""
        if self.is_multiframe:
            return list(self.datasets)
        return [self.datasets[fr.dataset_index] for fr in self.slice_frames]

    def frames_to_slices(self) -> list[int]:
        """For the i-th frame highdicom expects (see :meth:`ordered_datasets`), its grid slice index."""
        if self.is_multiframe:
            by_frame = sorted(range(len(self.slice_frames)), key=lambda k: self.slice_frames[k].frame_number)
            return by_frame
        return list(range(len(self.slice_frames)))

    @property
    def modality(self) -> str:
        return _text(self.datasets[0], "Modality")


def load_source_series(source: StrPath | Sequence[StrPath], *, grid: Grid | sitk.Image | None = None) -> SourceSeries:
    """Load the headers of the source series and map each of its frames onto the voxel grid.

    ``source``: a folder holding one DICOM series (read and checked with
    :func:`~MedDiffSegLib.io.read_dicom_series`, whose image defines the grid), or a list of the
    series' files (single-frame files of one series, or one multi-frame file).
    ``grid``: the series' grid when the caller already has it (e.g. the image it segmented),
    which skips reading the pixel data of a folder.

    Raises :class:`InputError` for anything that keeps a derived object from referencing the
    source exactly: several series, missing geometry attributes, frames off the grid.
    """
    from ..io.volume import read_dicom_series

    if isinstance(source, (str, os.PathLike)):
        shown = os.fspath(source)
        p = Path(source)
        if p.is_dir():
            if grid is None:
                image, files = read_dicom_series(p)
                grid = Grid.of(image)
            else:
                files = _series_files_in(p, shown)
        elif p.is_file():
            files = [str(p)]
        else:
            raise InputError(f"{shown} does not exist (expected the folder of the source DICOM series)")
    else:
        files = [os.fspath(f) for f in source]
        shown = f"the {len(files)} source files"
        if not files:
            raise InputError("no source DICOM files given")
    if isinstance(grid, sitk.Image):
        grid = Grid.of(grid)

    datasets: list[Dataset] = []
    names: list[str] = []
    for f in files:
        name = Path(f).name
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"source DICOM file {f} cannot be read: {exc}") from exc
        datasets.append(ds)
        names.append(name)
    modalities = {_text(ds, "Modality") for ds in datasets}
    if modalities & {"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG", "RTPLAN"}:
        raise InputError(f"{shown} holds a {'/'.join(sorted(modalities))} object, not the image series it refers to")
    if len(datasets) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise InputError(f"{shown}: several multi-frame files; pass one multi-frame file or one file per slice")
    notes = _repair_headers(datasets, names)

    frames: list[SourceFrame] = []
    for i, (ds, name) in enumerate(zip(datasets, names)):
        for fr in frame_geometry(ds, name):
            frames.append(SourceFrame(i, fr.frame_number, fr.position, fr.row_direction, fr.column_direction,
                                      fr.pixel_spacing, fr.rows, fr.columns))
    if grid is None:
        grid = _grid_from_frames(frames, shown)
    slice_frames = _map_frames(frames, grid, names, shown)
    return SourceSeries(files=files, datasets=datasets, grid=grid, slice_frames=slice_frames, notes=notes)


def _series_files_in(folder: Path, shown: str) -> list[str]:
    """The files of the one series in ``folder`` without reading pixel data (GDCM, as read_dicom_series)."""
    from ..io.volume import _itk_warnings_off  # same GDCM grouping as read_dicom_series

    with _itk_warnings_off():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        from ..io.volume import read_dicom_series

        read_dicom_series(folder)  # raises the usual, detailed error (none or several series)
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _map_frames(frames: list[SourceFrame], grid: Grid, names: list[str], shown: str) -> list[SourceFrame]:
    """Assign each grid slice the source frame lying on it, by physical position."""
    ref = grid.matrix
    slice_frames: list[SourceFrame | None] = [None] * grid.size[2]
    for fr in frames:
        name = names[fr.dataset_index] + (f" frame {fr.frame_number}" if fr.frame_number else "")
        if (np.abs(ref[:, 0] - fr.row_direction).max() > _DIRECTION_TOL
                or np.abs(ref[:, 1] - fr.column_direction).max() > _DIRECTION_TOL):
            raise InputError(f"{shown}: {name} is oriented {_fmt_vec(fr.row_direction + fr.column_direction, 4)}, "
                             f"not along the series' rows and columns")
        if (fr.columns, fr.rows) != grid.size[:2]:
            raise InputError(f"{shown}: {name} is {fr.columns}×{fr.rows} pixels, the series {_size_text(grid.size[:2])}")
        if not np.allclose((fr.pixel_spacing[1], fr.pixel_spacing[0]), grid.spacing[:2], rtol=_SPACING_RTOL, atol=_SPACING_ATOL_MM):
            raise InputError(f"{shown}: {name} has pixel spacing {_fmt_vec(fr.pixel_spacing)}, "
                             f"the series {_fmt_vec(grid.spacing[1::-1])}")
        index = grid.continuous_index(fr.position)
        k = int(round(index[2]))
        off = np.abs(index - np.array([0.0, 0.0, k]))
        if np.any(off > _VOXEL_TOL) or not 0 <= k < grid.size[2]:
            raise InputError(f"{shown}: {name} at {_fmt_vec(fr.position)} mm does not lie on a slice of the "
                             f"series' grid (continuous index {_fmt_vec(index, 5)})")
        if slice_frames[k] is not None:
            raise InputError(f"{shown}: two source frames lie on slice {k} ({name} and another)")
        slice_frames[k] = fr
    missing = [k for k, fr in enumerate(slice_frames) if fr is None]
    if missing:
        raise InputError(f"{shown}: no source frame lies on slice(s) {missing[:10]} of the series' grid "
                         f"({len(frames)} frames for {grid.size[2]} slices)")
    return slice_frames  # type: ignore[return-value]


# ---- writing ------------------------------------------------------------------------------------


def write_dataset_atomic(ds: Dataset, path: StrPath) -> Path:
    """Write a DICOM data set (with file meta) so that ``path`` is either complete or untouched."""
    shown = os.fspath(path)
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write {shown}: it is an existing folder")
    tmp_name: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{target.name}", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        publish_file(tmp_name, target)  # 0644 like the NIfTI outputs, not mkstemp's 0600
        tmp_name = None
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror or exc}") from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return target


def check_output_path(path: StrPath) -> Path:
    """Raise :class:`OutputError` unless a file can be created at ``path`` (nothing is created)."""
    shown = os.fspath(path)
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputError(f"cannot write {shown}: it is an existing folder")
    parent = target.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {shown}: {parent} is not a folder")
    kernel_fs = pseudo_filesystem(target)
    if kernel_fs is not None:
        raise OutputError(f"cannot write {shown}: it is on {kernel_fs}, a kernel file system that holds no files; "
                          "choose a folder on a disk")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown}: no write permission on {parent}")
    return target


__all__ = [
    "Grid",
    "SourceFrame",
    "SourceSeries",
    "align_to_grid",
    "check_output_path",
    "frame_geometry",
    "load_source_series",
    "write_dataset_atomic",
]
