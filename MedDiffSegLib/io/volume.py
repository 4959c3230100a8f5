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


_CHUNK = 1 << 22  # bytes read (and at most produced by decompression) at a time


def _file_chunks(path: Path, shown: str) -> Iterator[bytes]:
    """The file's bytes in chunks of at most :data:`_CHUNK`, decompressed for a ``.gz`` file (concatenated
    members too); raises :class:`InputError` for a corrupt or truncated gzip stream."""
    gz = path.name.lower().endswith(".gz")
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gz else None
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                if decoder is None:
                    yield chunk
                    continue
                data = chunk
                while data:
                    out = decoder.decompress(data, _CHUNK)
                    if out:
                        yield out
                    if decoder.eof and decoder.unused_data:  # the next gzip member
                        data = decoder.unused_data
                        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                    else:
                        data = decoder.unconsumed_tail
    except zlib.error as exc:
        raise InputError(f"{shown} is a corrupt gzip file ({exc}); download or export it again") from exc
    if decoder is not None and not decoder.eof:
        raise InputError(f"{shown} is truncated (its gzip stream ends early); download or export it again")


def _check_gzip_complete(path: Path, shown: str) -> None:
    """Raise if a ``.gz`` file is truncated or corrupt.

    ITK's NIfTI reader fills the missing part of a truncated ``.nii.gz`` with zeros without
    an error; an interrupted download would then be segmented as if it were a real scan.
    """
    for _ in _file_chunks(path, shown):
        pass


#: NIfTI datatype codes of floating-point voxels -> numpy type of one value (complex: two of them).
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}


def _nifti_layout(raw: bytes) -> tuple[str, list[int], int, int, int] | None:
    """(byte order, dims, datatype, bits per voxel, vox_offset) of a NIfTI-1/2 header; None if it is not one."""
    import struct

    for order in "<>":
        if len(raw) >= 348 and struct.unpack_from(f"{order}i", raw, 0)[0] == 348:
            dim = struct.unpack_from(f"{order}8h", raw, 40)
            datatype, bitpix = struct.unpack_from(f"{order}2h", raw, 70)
            offset = struct.unpack_from(f"{order}f", raw, 108)[0]
            break
        if len(raw) >= 540 and struct.unpack_from(f"{order}i", raw, 0)[0] == 540:
            datatype, bitpix = struct.unpack_from(f"{order}2h", raw, 12)
            dim = struct.unpack_from(f"{order}8q", raw, 16)
            offset = struct.unpack_from(f"{order}q", raw, 168)[0]
            break
    else:
        return None
    n = int(dim[0])
    if not 1 <= n <= 7 or not np.isfinite(offset):
        return None
    return order, [max(int(d), 0) for d in dim[1:n + 1]], int(datatype), int(bitpix), int(offset)


def _check_nifti_data(path: Path, shown: str) -> None:
    """Read a NIfTI file's voxel bytes once (with the gzip check for ``.nii.gz``): raise :class:`InputError`
    when they end before the header's size says (a truncated ``.nii`` that ITK would pad with zeros) or when
    floating-point voxels are NaN or infinite (ITK's NIfTI reader turns those into 0 without a word).
    Integer voxels of an uncompressed file are not read, only its size is checked."""
    chunks = _file_chunks(path, shown)
    head = b""
    if path.name.lower().endswith(".gz"):
        for chunk in chunks:
            head += chunk
            if len(head) >= 540:
                break
    else:
        with open(path, "rb") as f:
            head = f.read(540)
    layout = _nifti_layout(head[:540])
    if layout is None:  # not a NIfTI header: the gzip check alone
        for _ in chunks:
            pass
        return
    order, dims, datatype, bitpix, offset = layout
    expected = offset + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
    kind = _NIFTI_FLOATS.get(datatype)
    if kind is None and not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        if size < expected:
            raise InputError(f"{shown} is truncated ({size} bytes; its header needs {expected}); export it again")
        return
    if not path.name.lower().endswith(".gz"):
        head = b""  # the plain file is read from its start below
    total, bad, leftover = 0, 0, b""
    for chunk in _chain(head, chunks):
        start = max(offset - total, 0)
        total += len(chunk)
        if kind is None or start >= len(chunk):
            continue
        data = leftover + chunk[start:]
        usable = len(data) - len(data) % int(kind[1])
        values = np.frombuffer(data[:usable], dtype=order + kind)
        bad += int(values.size - np.count_nonzero(np.isfinite(values)))
        leftover = data[usable:]
    if total < expected:
        raise InputError(f"{shown} is truncated (its voxel data end after {total} of {expected} bytes); download "
                         "or export it again")
    if bad:
        raise InputError(f"{shown}: {bad} of its voxel values are NaN or infinite (a failed reconstruction or "
                         "conversion); MedDiffSeg needs finite intensities")


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _check_shape(shown: str, dimension: int, size: Sequence[int], components: int, hint: str = "") -> None:
    """Reject everything that is not a single-component 3D volume with at least 2 voxels per axis."""
    if size and all(int(s) == 1 for s in size):
        raise InputError(f"{shown} holds a single voxel (size {_size_text(size)}): MedDiffSeg segments 3D volumes")
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


# ---- geometry and voxel values ------------------------------------------------------------
_DIRECTION_ORTHO_TOL = 1e-3  # |D^T D - I|: float32 headers and 6-digit DICOM cosines stay far below it
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fmt_numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def grid_problem(spacing: Sequence[float], direction: Sequence[float]) -> str:
    """What is wrong with a voxel grid's spacing or direction ("" when nothing): every spacing must be a
    positive finite number of millimetres, and the direction matrix's columns perpendicular unit vectors."""
    sp = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        return f"its voxel spacing {_fmt_numbers(sp)} mm is not positive and finite"
    n = sp.size
    d = np.asarray(direction, dtype=np.float64)
    if d.size != n * n or not np.all(np.isfinite(d)):
        return f"its direction matrix {_fmt_numbers(d)} is not {n}×{n} finite numbers"
    d = d.reshape(n, n)
    if abs(float(np.linalg.det(d))) < 1e-6:
        return (f"its direction matrix {_fmt_numbers(d.reshape(-1))} is degenerate (two axes point the same way, "
                "or one has no direction): the voxels cannot be placed")
    off = float(np.abs(d.T @ d - np.eye(n)).max())
    if off > _DIRECTION_ORTHO_TOL:
        return (f"its direction matrix {_fmt_numbers(d.reshape(-1))} is not orthonormal (its axes are not "
                f"perpendicular unit vectors; off by {off:.3g}): a sheared grid")
    return ""


def check_image(image: sitk.Image, shown: str) -> None:
    """Raise :class:`InputError` unless ``image`` has a usable grid (:func:`grid_problem`) and finite voxel
    values that float32 can hold (no NaN or infinity, e.g. from a scaling slope that overflows)."""
    problem = grid_problem(image.GetSpacing(), image.GetDirection())
    if problem:
        raise InputError(f"{shown}: {problem}; MedDiffSeg needs a regular 3D grid (fix the header, or resample "
                         "the image onto a regular grid first)")
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64):
        return  # integers are always finite and fit float32
    values = array_view(image)
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())  # NaN anywhere makes both NaN
    if np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) <= _FLOAT32_MAX:
        return
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        what = f"{bad} of its {values.size} voxels are NaN or infinite"
    else:
        what = f"its voxel values reach {max(abs(lo), abs(hi)):.3g}, beyond what a float32 holds"
    raise InputError(f"{shown}: {what} (a failed reconstruction, or a scaling slope or intercept in the header "
                     "that overflows); MedDiffSeg needs finite intensities")


def _nifti_header_problem(raw: bytes) -> str:
    """Spacing and scaling a NIfTI-1/2 header gives that ITK would silently replace ("" when fine).

    ITK (through nifti1_io) reads a zero, negative or NaN ``pixdim`` as another spacing or axis flip, and
    a NaN or infinite ``scl_slope``/``scl_inter`` as "no scaling": the voxels would be placed or scaled
    otherwise than the file says. ``raw``: the file's first 540 bytes (decompressed)."""
    import struct

    if len(raw) < 348:
        return ""
    for order in "<>":
        size = struct.unpack_from(f"{order}i", raw, 0)[0]
        if size == 348:
            ndim = struct.unpack_from(f"{order}h", raw, 40)[0]
            pixdim = struct.unpack_from(f"{order}8f", raw, 76)
            slope, inter = struct.unpack_from(f"{order}2f", raw, 112)
            break
        if size == 540 and len(raw) >= 540:
            ndim = struct.unpack_from(f"{order}q", raw, 16)[0]
            pixdim = struct.unpack_from(f"{order}8d", raw, 104)
            slope, inter = struct.unpack_from(f"{order}2d", raw, 176)
            break
    else:
        return ""
    n = min(max(int(ndim), 0), 3)
    for axis in range(1, n + 1):
        v = float(pixdim[axis])
        if not (np.isfinite(v) and v > 0):
            return f"its header gives voxel spacing pixdim[{axis}] = {v:g} (it must be a positive finite number of mm)"
    for name, v in (("scl_slope", slope), ("scl_inter", inter)):
        if not np.isfinite(v):
            return f"its header gives {name} = {v:g}: the scaling of its values is undefined"
    return ""


def _metaimage_header_problem(text: str) -> str:
    """A MetaImage header whose ``ElementSpacing``/``ElementSize`` is zero, negative or not a number (ITK
    reads a negative one as an axis flip and a NaN as zero); "" when fine."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("ElementSpacing", "ElementSize"):
            continue
        try:
            values = [float(v) for v in value.split()]
        except ValueError:
            return f"its header gives {key.strip()} = {value.strip()} (not numbers)"
        if not values or not all(np.isfinite(v) and v > 0 for v in values):
            return f"its header gives {key.strip()} = {value.strip()} (every spacing must be a positive finite number of mm)"
    return ""


def _file_header_problem(path: Path) -> str:
    """Problems a NIfTI or MetaImage header states that ITK would read past (see the two functions above)."""
    import gzip

    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                return _nifti_header_problem(f.read(540))
        if name.endswith((".mha", ".mhd")):
            with open(path, "rb") as f:
                head = f.read(1 << 16).decode("latin-1")
            return _metaimage_header_problem(head.split("ElementDataFile", 1)[0])
    except (OSError, EOFError, ValueError):  # unreadable or truncated: reading the image says so
        return ""
    return ""


# Known ITK refusals of a header, in words a user can act on.
_ITK_GEOMETRY_REASONS = (
    ("orthonormal", "its direction matrix (the qform/sform orientation) is not orthonormal: its axes are sheared or "
                    "degenerate"),
    ("Bad direction", "its direction matrix is degenerate (determinant 0): the voxels cannot be placed"),
    ("Zero-valued spacing", "its voxel spacing is zero or not a number"),
)


def _itk_geometry_reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in _ITK_GEOMETRY_REASONS:
        if needle in text:
            return reason
    return ""


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


_TAG_POSITION = "0020|0032"  # Image Position (Patient)
_TAG_ORIENTATION = "0020|0037"  # Image Orientation (Patient)
_TAG_PIXEL_SPACING = "0028|0030"  # Pixel Spacing
_GEOMETRY_TAGS = ((_TAG_POSITION, "ImagePositionPatient (0020,0032)", 3),
                  (_TAG_ORIENTATION, "ImageOrientationPatient (0020,0037)", 6),
                  (_TAG_PIXEL_SPACING, "PixelSpacing (0028,0030)", 2))


def _numbers(reader: sitk.ImageFileReader, key: str) -> list[float]:
    """A multi-valued decimal DICOM tag as numbers (``[]`` when absent or not numbers)."""
    try:
        return [float(v) for v in _tag(reader, key).replace("\\", " ").split()]
    except ValueError:
        return []


def _check_slice_geometry_tags(shown: str, file_name: str, header: sitk.ImageFileReader) -> None:
    """Each slice of a series must state its position, orientation and pixel spacing, and sensibly: GDCM
    would read a missing tag as the origin, the identity or 1 mm and place the voxels wrongly."""
    values = {}
    for key, name, count in _GEOMETRY_TAGS:
        numbers = _numbers(header, key)
        if not header.HasMetaDataKey(key) or not _tag(header, key):
            raise InputError(f"{shown}: DICOM file {file_name} has no {name}: where its slice lies is unknown; "
                             "MedDiffSeg does not guess the geometry of a series")
        if len(numbers) != count or not all(np.isfinite(numbers)):
            raise InputError(f"{shown}: DICOM file {file_name} has {name} = {_tag(header, key)!r}; expected "
                             f"{count} numbers")
        values[key] = np.asarray(numbers)
    spacing = values[_TAG_PIXEL_SPACING]
    if np.any(spacing <= 0):
        raise InputError(f"{shown}: DICOM file {file_name} has PixelSpacing (0028,0030) = {_fmt_numbers(spacing)} mm; "
                         "every spacing must be positive")
    row, col = values[_TAG_ORIENTATION][:3], values[_TAG_ORIENTATION][3:]
    off = max(abs(float(np.linalg.norm(row)) - 1.0), abs(float(np.linalg.norm(col)) - 1.0), abs(float(row @ col)))
    if off > _DIRECTION_ORTHO_TOL:
        raise InputError(f"{shown}: DICOM file {file_name} has ImageOrientationPatient (0020,0037) = "
                         f"{_fmt_numbers(values[_TAG_ORIENTATION])}: its row and column directions are not "
                         "perpendicular unit vectors, so its pixels cannot be placed")


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
        if len(files) > 1:  # one file per slice: each must say where it lies (GDCM would default silently)
            _check_slice_geometry_tags(shown, Path(name).name, header)
        sizes.append(tuple(size[:2]))
        directions.append(np.array(header.GetDirection(), dtype=np.float64).reshape(3, 3))
        origins.append(np.array(header.GetOrigin(), dtype=np.float64))

    size_counts = Counter(sizes)
    if len(size_counts) > 1:
        listed = ", ".join(f"{_size_text(s)} ({n} files)" for s, n in size_counts.most_common())
        raise InputError(f"{shown} holds a DICOM series whose slices have different sizes: {listed}")
    if len(files) > 1:
        spacings = [_numbers(_header(name), _TAG_PIXEL_SPACING) for name in files]
        first = spacings[0]
        odd = sum(1 for sp in spacings if not np.allclose(sp, first, rtol=1e-4, atol=1e-6))
        if odd:
            raise InputError(f"{shown} holds a DICOM series whose slices have different pixel spacings "
                             f"({odd} of {len(files)} files differ from the first, {_fmt_numbers(first)} mm): they "
                             "contradict each other, so the series cannot form one 3D volume")
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

    Raises :class:`InputError` for a missing path, an unreadable, truncated or corrupt file, a 2D
    or 4D image or a single voxel, a vector/RGB image, a zero, negative or NaN spacing or a
    sheared or degenerate direction (in the header, also where ITK would silently replace it, or
    in the image read), NaN or infinite voxel values or values float32 cannot hold (an
    overflowing scaling slope), and for the folder problems listed in :func:`read_dicom_series`.
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
        with _itk_warnings_off():  # NIfTI headers ITK corrects are refused below, with a reason
            reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Unable to determine ImageIO reader" in str(exc):
            raise InputError(f"{shown} is not an image file MedDiffSeg can read: expected {ACCEPTED_INPUTS}") from exc
        if _itk_geometry_reason(exc):
            raise InputError(f"{shown}: {_itk_geometry_reason(exc)}; MedDiffSeg needs a regular 3D grid (fix the "
                             "header, or resample the image onto a regular grid first)") from exc
        raise InputError(f"{shown} could not be read as an image ({reason}): expected {ACCEPTED_INPUTS}") from exc
    problem = _file_header_problem(p)
    if problem:
        raise InputError(f"{shown}: {problem}; MedDiffSeg does not guess what the header means (fix the header, "
                         "e.g. export the scan again)")

    hint = ""
    if _is_dicom_file(p):
        modality = _tag(reader, _TAG_MODALITY)
        if modality in _NOT_IMAGES:
            raise InputError(_not_an_image_message(shown, modality))
        hint = " (this is one DICOM file: pass the folder that holds the whole series)"
    _check_shape(shown, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), hint)
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(p, shown)  # the gzip check, truncation, and NaN/inf that ITK would turn into 0
    elif p.name.lower().endswith(".gz"):
        _check_gzip_complete(p, shown)
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError as exc:
        if _itk_geometry_reason(exc):
            raise InputError(f"{shown}: {_itk_geometry_reason(exc)}; MedDiffSeg needs a regular 3D grid (fix the "
                             "header, or resample the image onto a regular grid first)") from exc
        raise InputError(f"{shown}: the header reads but the voxel data do not ({_itk_reason(exc)})") from exc
    check_image(image, shown)
    return image


def read_dicom_series(folder: StrPath) -> tuple[sitk.Image, list[str]]:
    """Read the one DICOM series in ``folder`` (not searched recursively).

    Returns the image and its file names (full paths) in slice order: ``file_names[k]`` holds
    slice ``k`` of the image (needed to reference the source instances in a DICOM-SEG).

    Raises :class:`InputError` when the folder is missing or not a folder, holds no DICOM
    files, holds several series (each is listed), or when the slices of the series do not form
    one regular 3D grid (a slice without ImagePositionPatient, ImageOrientationPatient or
    PixelSpacing, or with values that are not numbers or not sensible; different sizes, pixel
    spacings or orientations; duplicate or unevenly spaced slices; gantry tilt), when the series
    has a single 2D slice, or when its voxel values are not finite after the rescale slope.
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
    check_image(image, shown)
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


class _ImageVoxels:
    """Hands an image's voxel buffer to numpy while holding the image (see :func:`array_view`)."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def array_view(image: sitk.Image) -> np.ndarray:
    """A read-only numpy view ``[z, y, x]`` (``[z, y, x, c]`` for vectors) of ``image``'s voxels, without a copy,
    that keeps ``image`` alive for as long as the view or any array derived from it without a copy exists.

    ``sitk.GetArrayViewFromImage`` does not: its view reads freed memory (or crashes) once the image it
    came from is dropped. Use this wherever a view may outlive the variable that holds the image (kept
    in a dict, returned, passed on).
    """
    return np.asarray(_ImageVoxels(image))


#: Kernel file systems: they hold no user files (writing there fails, or worse, changes the kernel's settings).
_PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
    "pstore", "bpf", "efivarfs", "fusectl", "binfmt_misc", "mqueue", "hugetlbfs", "autofs", "rpc_pipefs", "nsfs",
})


def pseudo_filesystem(path: StrPath) -> str | None:
    """The kernel file system (``proc``, ``sysfs``, ``devtmpfs``...) that ``path`` would be created on, or None.

    Judged on the nearest existing ancestor of ``path`` (links resolved): ``/proc`` and ``/sys`` by their
    place, anything else by the mount table (``/proc/self/mounts``, where the system has one).
    """
    current = Path(path).expanduser().absolute()
    while not current.exists() and current.parent != current:
        current = current.parent
    resolved = current.resolve()
    top = resolved.parts[1] if len(resolved.parts) > 1 else ""
    if top in ("proc", "sys"):
        return "proc" if top == "proc" else "sysfs"
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))  # \040 is a space
        if (point == resolved or point in resolved.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind if kind in _PSEUDO_FILESYSTEMS else None


def _current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux); else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # another thread may create a file in between: only where /proc cannot say
    os.umask(mask)
    return mask


def publish_file(tmp: StrPath, target: StrPath) -> None:
    """Rename a finished temporary file into place with the permissions of a newly created file (``0666``
    less the umask, 0644 usually), as the image files get: ``tempfile.mkstemp`` makes its files private (0600)."""
    os.chmod(tmp, 0o666 & ~_current_umask())
    os.replace(tmp, target)


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
