"""Pieces shared by the SEG and Parametric Map writers."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydicom.dataset import Dataset

from ..errors import InputError

MANUFACTURER = "MedDiffSeg"
CONTENT_CREATOR = "MedDiffSeg^"  # a PN; the caret marks a one-component name

# Patient/study attributes copied from the source beyond the ones highdicom copies itself
# (Patient Name/ID/Birth Date/Sex, Study Instance UID/ID/Date/Time, Accession Number,
# Referring Physician). Only copied when present and not empty.
EXTRA_COPIED = (
    "IssuerOfPatientID",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyDescription",
    "BodyPartExamined",
)


def copy_extra_attributes(source: Dataset, target: Dataset) -> None:
    for keyword in EXTRA_COPIED:
        if keyword in target or keyword not in source:
            continue
        value = source[keyword].value
        if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
            continue
        target[keyword] = source[keyword]


@contextmanager
def quiet_highdicom() -> Iterator[None]:
    """highdicom warns about odd source values, sometimes quoting them (patient names): never shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def lo(text: str) -> str:
    """A value that fits a LO (long string) element: at most 64 characters, no backslash."""
    return str(text).replace("\\", "/")[:64]


def series_number_from(source: Dataset, offset: int) -> int:
    """A series number for a derived series: the source's plus ``offset`` (``offset`` if it has none)."""
    try:
        base = int(source.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        base = 0
    number = base + offset
    return number if 0 < number < 2**31 else offset


def finite_or_error(array, what: str) -> None:
    import numpy as np

    if not np.isfinite(array).all():
        raise InputError(f"{what} contains NaN or infinite values")


@dataclass
class DicomExport:
    """What an export wrote: where, which UIDs, which segments, and what was filled in."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    number_of_frames: int
    segments: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_record(ds, path: Path, segments=None, notes=None) -> DicomExport:
    """The :class:`DicomExport` describing data set ``ds`` written to ``path``."""
    return DicomExport(
        path=path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
        frame_of_reference_uid=str(ds.FrameOfReferenceUID), number_of_frames=int(ds.NumberOfFrames),
        segments=list(segments or []), notes=list(notes or []),
    )
