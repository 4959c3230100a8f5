"""Modality (CT or MR) of a volume node, and which model packages fit it (no Qt, no torch).

The rules are the library's (:mod:`MedDiffSegLib.modality`), applied to a volume node:

- a volume loaded from DICOM has its source instances' SOP Instance UIDs in ``DICOM.instanceUIDs``
  (see :mod:`.dicomexport`); the Modality tag of the first one's file, found through the DICOM
  database, says CT or MR (its voxels are checked against the tag: a series tagged MR whose values
  look like Hounsfield units, or one tagged CT whose values do not, is warned about and refused
  unless the user confirms, as the library refuses it);
- otherwise (or when the database does not know the files, or the tag is neither CT nor MR) the
  voxels decide: CT when they are plausible as Hounsfield units
  (:func:`MedDiffSegLib.modality.hu_plausibility`), MR when not, unknown (None: every model is
  offered, none is warned about) when they cannot tell (a blank volume).

A package's modality is read from its ``model.json`` (:func:`packageModality`): nothing here
imports torch. The Widget offers the models that fit the volume first and shows
:func:`mismatchWarning` when the chosen one does not; :func:`checkVolume` is the check a run makes
before it starts (the worker and the library make the same one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from MedDiffSegLib.modality import (
    MODALITIES,
    HUCheck,
    InputModality,
    ModalityCheck,
    check_model_fits,
    dicom_modality,
    hu_plausibility,
    pick_default,
    read_package_modality,
)

log = logging.getLogger(__name__)

_AN = {"CT": "a", "MR": "an"}


@dataclass(frozen=True)
class VolumeModality:
    """What a volume node is, and how that is known."""

    modality: str | None          # "CT", "MR", or None when the voxels cannot tell (one value)
    source: str                   # "dicom" (its series' Modality tag) or "intensities"
    dicomTag: str = ""            # the raw Modality tag when the volume came from DICOM ("" otherwise)
    hu: HUCheck | None = None     # the intensity check (for a DICOM volume: checked against its tag)

    def text(self) -> str:
        """E.g. "MR (DICOM Modality)" or "CT (intensities in Hounsfield units)"."""
        if self.source == "dicom":
            return f"{self.modality} (DICOM Modality)"
        if self.modality is None:
            return "of unknown modality (its voxels all have one value)"
        how = "intensities in Hounsfield units" if self.modality == "CT" else "intensities not in Hounsfield units"
        note = f"; DICOM Modality {self.dicomTag}" if self.dicomTag else ""
        return f"{self.modality} ({how}{note})"

    def contradictingText(self) -> str:
        """For a DICOM volume whose voxels contradict its Modality tag, a sentence saying so ("" otherwise)."""
        if self.source != "dicom" or self.hu is None or self.hu.plausible is None:
            return ""
        byVoxels = "CT" if self.hu.plausible else "MR"
        if byVoxels == self.modality:
            return ""
        how = "look like a CT in Hounsfield units" if self.hu.plausible else "are not in Hounsfield units"
        return (f"this volume is tagged {self.modality} in DICOM, but its intensities {how}: if it is "
                f"{_AN[byVoxels]} {byVoxels}, choose {_AN[byVoxels]} {byVoxels} model.")

    def inputModality(self) -> InputModality:
        """What the library's check knows before looking at the voxels: the DICOM tag, or nothing."""
        if self.source == "dicom":
            return InputModality(self.modality, "dicom", self.dicomTag)
        return InputModality(None, None, "")

    def declaredForWorker(self) -> str | None:
        """The modality to declare to the worker, which only sees the voxels written to a file."""
        return self.modality if self.source == "dicom" else None


def dicomModalityTag(volumeNode, database) -> str:
    """The Modality tag of the DICOM series ``volumeNode`` was loaded from; "" when unknown."""
    from .dicomexport import instanceUIDs

    uids = instanceUIDs(volumeNode)
    if not uids or database is None:
        return ""
    try:
        path = database.fileForInstance(uids[0])
    except Exception as exc:  # a broken database must not break the panel
        log.warning("looking up a DICOM instance failed: %s", exc)
        return ""
    return dicom_modality(path) if path and Path(path).is_file() else ""


def volumeModality(volumeNode, database=None) -> VolumeModality:
    """CT or MR for ``volumeNode``: its DICOM Modality tag when it is CT or MR, else its intensities (which
    are checked against the tag too)."""
    from .geometry import volumeArray

    tag = dicomModalityTag(volumeNode, database)
    hu = hu_plausibility(volumeArray(volumeNode))
    if tag in MODALITIES:
        return VolumeModality(tag, "dicom", tag, hu)
    modality = None if hu.plausible is None else ("CT" if hu.plausible else "MR")
    return VolumeModality(modality, "intensities", tag, hu)


def packageModality(package) -> str:
    """The modality of a package (a ModelPackage, or its folder), from its ``model.json``."""
    path = getattr(package, "path", package)
    return read_package_modality(path)


def splitByModality(packages: Sequence[Any], modality: str | None) -> tuple[list[Any], list[Any]]:
    """(packages made for ``modality``, the others), each in the given order; a package whose
    ``model.json`` cannot be read counts as another modality."""
    if modality is None:
        return list(packages), []
    fitting, others = [], []
    for package in packages:
        try:
            fits = packageModality(package) == modality
        except Exception as exc:
            log.warning("cannot read the modality of %s: %s", getattr(package, "name", package), exc)
            fits = False
        (fitting if fits else others).append(package)
    return fitting, others


def defaultModelName(packages: Sequence[Any], modality: str = "CT") -> str:
    """Name of the default model for ``modality`` among ``packages`` (the library's rule); "" for none."""
    installed = {}
    for package in packages:
        try:
            installed[package.name] = packageModality(package)
        except Exception:
            continue
    return pick_default(modality, installed) or ""


def mismatchWarning(packageName: str, packageModalityValue: str, volume: VolumeModality | None) -> str:
    """The warning the panel shows when the chosen model is not made for the volume's modality, or the volume's
    DICOM tag and its voxels disagree ("" when neither): what a run refuses unless the user confirms."""
    if volume is None or volume.modality is None:
        return ""
    contradiction = volume.contradictingText()
    if packageModalityValue == volume.modality:
        return contradiction[0].upper() + contradiction[1:] if contradiction else ""
    return " ".join(t for t in (
        f"{packageName} is {_AN.get(packageModalityValue, 'a')} {packageModalityValue} model, but this volume is "
        f"{volume.text()}: choose {_AN.get(volume.modality, 'a')} {volume.modality} model for it.",
        contradiction[0].upper() + contradiction[1:] if contradiction else "") if t)


def checkVolume(package, volume: VolumeModality, volumeNode=None, *, allowMismatch: bool = False,
                fittingModels: Callable[[str], Sequence[str]] | None = None) -> ModalityCheck:
    """The library's :func:`~MedDiffSegLib.modality.check_model_fits` for ``package`` on this volume.

    Raises :class:`~MedDiffSegLib.errors.ModalityMismatchError` on a mismatch unless ``allowMismatch``.
    ``volumeNode`` is needed when ``volume`` came from the DICOM tag: its intensities are then checked
    against the tag (a series tagged MR whose values look like Hounsfield units is refused, as one
    tagged CT whose values do not).
    """
    from .geometry import volumeArray

    hu = volume.hu
    modalityValue = packageModality(package)
    array = None
    if hu is None and volumeNode is not None:
        array = volumeArray(volumeNode)
    return check_model_fits(modalityValue, getattr(package, "name", str(package)), volume.inputModality(), array,
                            hu=hu, allow_mismatch=allowMismatch, fitting_models=fittingModels)
