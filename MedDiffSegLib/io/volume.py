"""Reading and writing volumes: files SimpleITK reads, DICOM series folders, atomic writes.

Every problem a user can cause with an input becomes an :class:`~MedDiffSegLib.errors.InputError`
whose message names the path as the user gave it and says what is wrong and what is accepted.
Messages never include patient data (names, IDs, dates): only paths, sizes, and the series
identifiers needed to tell several series apart (SeriesInstanceUID, modality, description).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError

StrPath = str | os.PathLike

ACCEPTED_INPUTS = (
    "a 3D volume file (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage .mha/.mhd, "
    "or another format SimpleITK reads) or a folder holding one DICOM series"
)

# DICOM tags read through SimpleITK/GDCM.
_TAG_MODALITY = "0008|0060"
_TAG_SERIES_DESCRIPTION = "0008|103e"

# Tolerances for checking that the slices of a DICOM series form one regular grid.
_ORIENTATION_TOL = 1e-4  # direction cosines
_SAME_POSITION_MM = 1e-3  # two slices closer than this along the normal are duplicates
_SPACING_REL_TOL = 0.1  # allowed deviation of one slice gap from the median gap
_SPACING_ABS_TOL_MM = 0.01
_SHEAR_REL_TOL = 0.01  # in-plane drift of slice positions (gantry tilt), relative to the stack height


def _itk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK exception message (drops source locations and object ids)."""
    text = str(exc)
    if "ERROR:" in text:
        text = text.split("ERROR:", 1)[1]
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = " ".join(text.split())
    return text[:300]


def _size_text(size: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in size)


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _check_gzip_complete(path: Path, shown: str) -> None:
    """Raise if a ``.gz`` file is truncated or corrupt.

    ITK's NIfTI reader fills the missing part of a truncated ``.nii.gz`` with zeros without
    an error; an interrupted download would then be segmented as if it were a real scan.
    """
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                decoder.decompress(chunk, 0)
                while decoder.eof and decoder.unused_data:  # concatenated gzip members
                    rest = decoder.unused_data
                    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                    decoder.decompress(rest, 0)
    except zlib.error as exc:
        raise InputError(f"{shown} is a corrupt gzip file ({exc}); download or export it again") from exc
    if not decoder.eof:
        raise InputError(f"{shown} is truncated (its gzip stream ends early); download or export it again")


def _check_shape(shown: str, dimension: int, size: Sequence[int], components: int, hint: str = "") -> None:
    """Reject everything that is not a single-component 3D volume with at least 2 voxels per axis."""
    if dimension == 2 or (dimension == 3 and min(size) == 1):
        raise InputError(
            f"{shown} is 2D (size {_size_text(size)}): MedDiffSeg segments 3D volumes{hint}"
        )
    if dimension == 4:
        raise InputError(
            f"{shown} is 4D (size {_size_text(size)}): a time series or several channels in one file; "
            "MedDiffSeg needs a single 3D volume (extract one time point or channel first)"
        )
    if dimension != 3:
        raise InputError(f"{shown} has {dimension} dimensions (size {_size_text(size)}): MedDiffSeg needs a 3D volume")
    if components != 1:
        raise InputError(
            f"{shown} has {components} components per voxel (a vector or RGB image): "
            "MedDiffSeg needs one grey value per voxel, as in a CT or MR scan"
        )


# ---- DICOM ------------------------------------------------------------------------------
# Modalities of DICOM objects that hold results or annotations, not a scan to segment.
_NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "SR", "PR", "KO", "REG"}


def _not_an_image_message(shown: str, modality: str) -> str:
    what = "a DICOM segmentation (SEG)" if modality == "SEG" else f"a DICOM {modality} object"
    return f"{shown} holds {what}, not a CT or MR scan: pass the image series it refers to"


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _header(file_name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _describe_series(folder: str, series_uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)
    modality, description = "?", ""
    if files:
        try:
            header = _header(files[0])
            modality = _tag(header, _TAG_MODALITY) or "no modality"
            description = _tag(header, _TAG_SERIES_DESCRIPTION)
        except RuntimeError:
            pass
    uid = series_uid or "(empty)"
    desc = f'"{description}"' if description else "(no description)"
    return f"  - SeriesInstanceUID {uid}, {modality}, {desc}, {len(files)} files"


def _no_dicom_message(folder: Path, shown: str) -> str:
    entries = list(folder.iterdir())
    if not entries:
        return f"{shown} is an empty folder: expected {ACCEPTED_INPUTS}"
    n_dirs = sum(1 for e in entries if e.is_dir())
    n_files = len(entries) - n_dirs
    msg = f"{shown} contains no DICOM files ({n_files} other files, {n_dirs} subfolders): expected {ACCEPTED_INPUTS}"
    if n_dirs:
        msg += "; subfolders are not searched: if the series is in one, pass that folder"
    return msg


def _checked_slice_order(shown: str, files: Sequence[str]) -> list[str]:
    """Check that the files of one series form a regular 3D grid and return them in slice order.

    Reads headers only. Slices are ordered by position along the slice normal (ascending, as
    GDCM does when it can; GDCM falls back to other orders, e.g. when positions repeat).
    """
    sizes: list[tuple[int, ...]] = []
    directions: list[np.ndarray] = []
    origins: list[np.ndarray] = []
    for name in files:
        try:
            header = _header(name)
        except RuntimeError as exc:
            raise InputError(f"{shown}: DICOM file {Path(name).name} cannot be read ({_itk_reason(exc)})") from exc
        size = header.GetSize()
        if header.GetNumberOfComponents() != 1:
            raise InputError(
                f"{shown} holds a series with {header.GetNumberOfComponents()} components per pixel "
                "(colour/RGB images): MedDiffSeg needs a grey-level CT or MR series"
            )
        if len(size) == 3 and size[2] > 1 and len(files) > 1:
            raise InputError(
                f"{shown} holds a series of {len(files)} multi-frame DICOM files: "
                "MedDiffSeg reads either one multi-frame file or one file per slice"
            )
        if _tag(header, _TAG_MODALITY) in _NOT_IMAGES:
            raise InputError(_not_an_image_message(shown, _tag(header, _TAG_MODALITY)))
        sizes.append(tuple(size[:2]))
        directions.append(np.array(header.GetDirection(), dtype=np.float64).reshape(3, 3))
        origins.append(np.array(header.GetOrigin(), dtype=np.float64))

    size_counts = Counter(sizes)
    if len(size_counts) > 1:
        listed = ", ".join(f"{_size_text(s)} ({n} files)" for s, n in size_counts.most_common())
        raise InputError(f"{shown} holds a DICOM series whose slices have different sizes: {listed}")
    reference = directions[0][:, :2]
    n_odd = sum(1 for d in directions if np.abs(d[:, :2] - reference).max() > _ORIENTATION_TOL)
    if n_odd:
        raise InputError(
            f"{shown} holds a DICOM series whose slices have different orientations "
            f"({n_odd} of {len(files)} files differ from the first): it cannot form one 3D volume"
        )
    if len(files) < 2:
        return list(files)

    normal = np.cross(reference[:, 0], reference[:, 1])
    heights = np.array([float(o @ normal) for o in origins])
    order = np.argsort(heights, kind="stable")
    heights = heights[order]
    origins = [origins[i] for i in order]
    gaps = np.diff(heights)
    if gaps.min() < _SAME_POSITION_MM:
        n_dup = int((gaps < _SAME_POSITION_MM).sum())
        raise InputError(
            f"{shown} holds a DICOM series with several slices at the same position ({n_dup} duplicates): "
            "possibly several acquisitions sharing one SeriesInstanceUID; separate them into folders"
        )
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > max(_SPACING_ABS_TOL_MM, _SPACING_REL_TOL * median):
        raise InputError(
            f"{shown} holds a DICOM series with uneven slice spacing (gaps from {gaps.min():.3g} to "
            f"{gaps.max():.3g} mm): slices are missing or the spacing varies; MedDiffSeg needs evenly spaced slices"
        )
    drift = (origins[-1] - origins[0]) - (heights[-1] - heights[0]) * normal
    height = abs(heights[-1] - heights[0])
    if np.linalg.norm(drift) > max(_SPACING_ABS_TOL_MM, _SHEAR_REL_TOL * height):
        raise InputError(
            f"{shown} holds a DICOM series whose slices are not stacked along their normal "
            f"(shifted {np.linalg.norm(drift):.3g} mm sideways, e.g. a gantry tilt): it cannot be read as a "
            "regular 3D grid; resample it to a regular grid first"
        )
    return [files[i] for i in order]


# ---- reading ----------------------------------------------------------------------------
def read_volume(path: StrPath) -> sitk.Image:
    """Read a 3D volume file or a DICOM series folder; the pixel type is kept as stored.

    Raises :class:`InputError` for a missing path, an unreadable or corrupt file, a 2D or 4D
    image, a vector/RGB image, and for the folder problems listed in :func:`read_dicom_series`.
    """
    shown = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{shown} does not exist (expected {ACCEPTED_INPUTS})")
    if p.is_dir():
        image, _ = read_dicom_series(p)
        return image

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Unable to determine ImageIO reader" in str(exc):
            raise InputError(f"{shown} is not an image file MedDiffSeg can read: expected {ACCEPTED_INPUTS}") from exc
        raise InputError(f"{shown} could not be read as an image ({reason}): expected {ACCEPTED_INPUTS}") from exc

    hint = ""
    if _is_dicom_file(p):
        modality = _tag(reader, _TAG_MODALITY)
        if modality in _NOT_IMAGES:
            raise InputError(_not_an_image_message(shown, modality))
        hint = " (this is one DICOM file: pass the folder that holds the whole series)"
    _check_shape(shown, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), hint)
    if p.name.lower().endswith(".gz"):
        _check_gzip_complete(p, shown)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{shown}: the header reads but the voxel data do not ({_itk_reason(exc)})") from exc


def read_dicom_series(folder: StrPath) -> tuple[sitk.Image, list[str]]:
    """Read the one DICOM series in ``folder`` (not searched recursively).

    Returns the image and its file names (full paths) in slice order: ``file_names[k]`` holds
    slice ``k`` of the image (needed to reference the source instances in a DICOM-SEG).

    Raises :class:`InputError` when the folder is missing or not a folder, holds no DICOM
    files, holds several series (each is listed), or when the slices of the series do not form
    one regular 3D grid (different sizes or orientations, duplicate or unevenly spaced slices,
    gantry tilt), or when the series has a single 2D slice.
    """
    shown = os.fspath(folder)
    p = Path(folder)
    if not p.exists():
        raise InputError(f"{shown} does not exist (expected {ACCEPTED_INPUTS})")
    if not p.is_dir():
        raise InputError(f"{shown} is not a folder: expected a folder holding one DICOM series")

    with _itk_warnings_off():  # GDCM warns on stderr when a folder has no series
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    if not series:
        raise InputError(_no_dicom_message(p, shown))
    if len(series) > 1:
        listed = "\n".join(_describe_series(str(p), uid) for uid in series)
        raise InputError(
            f"{shown} holds {len(series)} DICOM series; MedDiffSeg reads one series at a time. "
            f"Put each series in its own folder (or pass the folder of the one to segment):\n{listed}"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series[0]))
    if not files:  # GDCM found a series but no readable image files in it
        raise InputError(_no_dicom_message(p, shown))

    files = _checked_slice_order(shown, files)
    # One file is a multi-frame volume (or a lone slice): the series reader would add a 4th axis.
    try:
        if len(files) == 1:
            image = sitk.ReadImage(files[0])
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{shown}: the DICOM series could not be read ({_itk_reason(exc)})") from exc
    _check_shape(shown, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                 " (the DICOM series in this folder has a single slice)")
    return image, files


def read_size(path: StrPath) -> tuple[int, ...] | None:
    """The voxel size (x, y, z) of a volume file or of the one DICOM series in a folder, from headers only.

    Cheap enough to check a study's size before reading it (one header; for a series, the file list).
    ``None`` when it cannot tell (missing or unreadable path, several series): reading the volume
    then reports the problem.
    """
    p = Path(path)
    try:
        with _itk_warnings_off():
            if p.is_dir():
                series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
                if len(series) != 1:
                    return None
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series[0])
                if not files:
                    return None
                size = tuple(int(v) for v in _header(files[0]).GetSize())
                if len(files) == 1:
                    return size
                return (*size[:2], len(files))
            return tuple(int(v) for v in _header(str(p)).GetSize())
    except (RuntimeError, OSError):
        return None


# ---- writing ----------------------------------------------------------------------------
def write_image_atomic(image: sitk.Image, path: StrPath, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` so that ``path`` is either complete or untouched.

    The image is written under its real file name inside a hidden temporary folder beside
    ``path`` (``.tmp-<random>-<name>``; same file system, and SimpleITK picks the format from
    the real extension), then moved into place with ``os.replace``. Formats with a separate
    data file (``.mhd``/``.raw``, ``.nhdr``) work too: the data file is moved first, the header
    last. Missing parent folders are created. On any failure the temporary folder is removed
    and :class:`OutputError` names ``path``.
    """
    shown = os.fspath(path)
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write {shown}: it is an existing folder")
    staging: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", suffix=f"-{target.name}", dir=target.parent))
        staged = staging / target.name
        sitk.WriteImage(image, str(staged), useCompression=compress)
        for companion in sorted(staging.iterdir()):
            if companion.name != target.name:
                os.replace(companion, target.parent / companion.name)
        os.replace(staged, target)
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Unable to determine ImageIO writer" in str(exc):
            reason = "unknown file extension (use .nii.gz, .nii, .nrrd, .mha, ...)"
        raise OutputError(f"cannot write {shown}: {reason}") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def image_from_array(array_zyx, reference: sitk.Image) -> sitk.Image:
    """A scalar image from a numpy ``[z, y, x]`` array with ``reference``'s spacing, origin, direction.

    ``bool`` arrays become ``uint8`` and ``float64`` arrays ``float32`` (SimpleITK has no bool
    type; the library keeps no float64 volumes). Torch tensors are accepted (moved to CPU).
    Raises ``ValueError`` if the shape is not ``reference``'s size reversed.
    """
    if hasattr(array_zyx, "detach"):  # torch.Tensor
        array_zyx = array_zyx.detach().cpu().numpy()
    array = np.asarray(array_zyx)
    expected = tuple(reversed(reference.GetSize()))
    if array.shape != expected:
        raise ValueError(f"array shape {array.shape} does not match the reference image ([z, y, x] = {expected})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.CopyInformation(reference)
    return image
