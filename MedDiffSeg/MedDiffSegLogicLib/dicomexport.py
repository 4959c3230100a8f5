"""Exporting a result: DICOM-SEG + Parametric Map into the DICOM database, or files (no Qt).

A DICOM Segmentation must reference the images it was drawn on, so it can only be made for a
volume loaded from DICOM. Slicer's DICOM plugins record the source instances of such a volume in
its ``DICOM.instanceUIDs`` attribute (space-separated SOP Instance UIDs); the DICOM database maps
each UID to its file. From those files the library (``MedDiffSegLib.dicom.export_dicom``) writes

- the DICOM-SEG: one segment per organ of the model used for the run (its display name, colour
  and SNOMED CT codes from the model package), the segmentation node's labelmap exported on the
  volume's exact voxel grid;
- the uncertainty Parametric Map (when the result has an uncertainty volume), in the same frame of
  reference;

and both are added to the DICOM database. The database is anything with the two methods of
:class:`DicomDatabase`; :class:`SlicerDicomDatabase` adapts Slicer's (``slicer.dicomDatabase``,
imported through ``DICOMLib.DICOMUtils.importDicom``), tests pass a stand-in.

For a volume that is not from DICOM, :func:`exportResult` explains why (:class:`NotFromDicomError`)
and, given a folder, writes ``.seg.nrrd`` + NIfTI label map (+ NIfTI uncertainty) instead, through
storage nodes that are not added to the scene.

Nothing is half-written: every check and all computing happen before the first file is written;
a failure afterwards (writing, importing into the database) removes what this export wrote and any
folder it created. Errors carry readable messages (the library's own text for its errors) and no
patient data.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from . import nodes as nodesLib
from .geometry import copyGeometry, dimensions, imageFromArray, imageFromVolumeNode

log = logging.getLogger(__name__)

#: Volume node attribute where Slicer's DICOM plugins list the loaded instances' SOP Instance UIDs.
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: Segmentation node reference to the result's uncertainty volume (set by :mod:`.segmentation`).
UNCERTAINTY_REFERENCE_ROLE = "MedDiffSegUncertainty"
#: File names in an export folder (the same as ``meddiffseg segment --dicom-seg`` writes).
SEG_FILE = "segmentation.dcm"
PMAP_FILE = "uncertainty_pmap.dcm"

NOT_DICOM_ADVICE = ("A DICOM-SEG has to reference the DICOM images it was drawn on. To get one, load the series "
                    "from Slicer's DICOM database (DICOM module) and segment that volume; otherwise export the "
                    "segmentation as .seg.nrrd and NIfTI files instead.")
FALLBACK_NOTE = ("A DICOM-SEG has to reference the DICOM images it was drawn on, so the segmentation was exported "
                 "as .seg.nrrd and NIfTI files instead.")


class ExportError(RuntimeError):
    """The export cannot be done as asked; the message says why."""


class NotFromDicomError(ExportError):
    """The input volume is not a series of the DICOM database: no DICOM-SEG can reference it.

    ``reason``: why (one sentence); the message adds what to do instead.
    """

    def __init__(self, reason: str, advice: str = NOT_DICOM_ADVICE):
        super().__init__(f"{reason} {advice}".strip())
        self.reason = reason


@runtime_checkable
class DicomDatabase(Protocol):
    """What the export needs of a DICOM database (``slicer.dicomDatabase`` through :class:`SlicerDicomDatabase`)."""

    def fileForInstance(self, sopInstanceUID: str) -> str:
        """Path of the file holding the instance; empty when the database does not know it."""

    def importFiles(self, paths: Sequence[str]) -> None:
        """Add the files to the database (raise when that fails)."""


class SlicerDicomDatabase:
    """:class:`DicomDatabase` on Slicer's ``ctkDICOMDatabase``.

    Files are imported with ``DICOMLib.DICOMUtils.importDicom(folder, database, copyFiles=True)``
    from a staging folder holding only them (the database keeps its own copies); without
    ``DICOMLib`` each file goes through ``database.insert(path)``. ``dicomUtils`` replaces the
    ``DICOMUtils`` module (tests).
    """

    def __init__(self, database, dicomUtils: Any = None):
        self.database = database
        self._dicomUtils = dicomUtils

    @classmethod
    def fromApplication(cls) -> "SlicerDicomDatabase | None":
        """The application's DICOM database, or None when there is none or it is not open."""
        database = getattr(_slicer(), "dicomDatabase", None)
        if database is None:
            return None
        isOpen = getattr(database, "isOpen", True)
        if callable(isOpen):
            isOpen = isOpen()
        return cls(database) if isOpen else None

    def fileForInstance(self, sopInstanceUID: str) -> str:
        return str(self.database.fileForInstance(sopInstanceUID) or "")

    def _utils(self):
        if self._dicomUtils is not None:
            return self._dicomUtils
        try:
            from DICOMLib import DICOMUtils
        except ImportError:
            return None
        return DICOMUtils

    def importFiles(self, paths: Sequence[str]) -> None:
        utils = self._utils()
        if utils is None:
            for path in paths:
                self.database.insert(str(path))  # storeFile defaults to true: the database keeps a copy
            return
        with tempfile.TemporaryDirectory(prefix="MedDiffSeg-import-") as staging:
            for path in paths:
                shutil.copy2(path, os.path.join(staging, Path(path).name))
            if not utils.importDicom(staging, self.database, copyFiles=True):
                raise ExportError("Slicer's DICOM database did not import the exported files "
                                  "(see the Python console for the indexer's message)")

    def removeSeries(self, seriesInstanceUID: str) -> None:
        remove = getattr(self.database, "removeSeries", None)
        if remove is not None:
            remove(seriesInstanceUID)


@dataclass
class ExportReport:
    """What an export wrote.

    ``dicom``: a DICOM-SEG (and Parametric Map) was written; False: files (.seg.nrrd, NIfTI)
    instead, ``explanation`` saying why. ``records``: the library's ``DicomExport`` per DICOM object.
    """

    dicom: bool
    paths: list[Path]
    explanation: str = ""
    notes: list[str] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    addedToDatabase: bool = False
    model: str = ""

    @property
    def segPath(self) -> Path | None:
        return self.paths[0] if self.dicom and self.paths else None

    @property
    def pmapPath(self) -> Path | None:
        return self.paths[1] if self.dicom and len(self.paths) > 1 else None

    def message(self) -> str:
        """A few lines for the user: what was written where, and anything filled in or left out."""
        lines = []
        if self.explanation:
            lines.append(self.explanation)
        if self.dicom:
            names = ", ".join(s.get("label", s.get("name", "")) for s in self.segments)
            lines.append(f"DICOM-SEG with {len(self.segments)} segment(s) ({names}): {self.paths[0]}")
            if self.pmapPath is not None:
                lines.append(f"Uncertainty as a DICOM Parametric Map: {self.pmapPath}")
            if self.addedToDatabase:
                lines.append("Both were added to Slicer's DICOM database." if self.pmapPath is not None
                             else "It was added to Slicer's DICOM database.")
        else:
            lines.append("Written: " + ", ".join(str(p) for p in self.paths))
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def _slicer():
    import slicer

    return slicer


# -- which nodes, which source ------------------------------------------------------------------------


def resultNodes(result, volumeNode=None, uncertaintyNode=None, includeUncertainty: bool = True):
    """(segmentation node, input volume node, uncertainty node or None) of a result or a segmentation node.

    ``result``: a ``MedDiffSegResult`` or a segmentation node (its volume is its reference geometry
    volume, its uncertainty the volume it references as ``MedDiffSegUncertainty``).
    """
    slicer = _slicer()
    if hasattr(result, "segmentationNode"):
        segmentationNode = result.segmentationNode
        volumeNode = volumeNode if volumeNode is not None else result.volumeNode
        if uncertaintyNode is None:
            uncertaintyNode = getattr(result, "uncertaintyNode", None)
    else:
        segmentationNode = result
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise ExportError("choose a segmentation to export")
    if segmentationNode.GetScene() is None:
        raise ExportError(f"segmentation {segmentationNode.GetName()!r} is no longer in the scene")
    if volumeNode is None:
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        volumeNode = segmentationNode.GetNodeReference(role)
    if volumeNode is None or volumeNode.GetImageData() is None or volumeNode.GetScene() is None:
        raise ExportError(f"the volume segmented in {segmentationNode.GetName()!r} is no longer in the scene")
    if uncertaintyNode is None:
        uncertaintyNode = segmentationNode.GetNodeReference(UNCERTAINTY_REFERENCE_ROLE)
    if not includeUncertainty or (uncertaintyNode is not None and (uncertaintyNode.GetScene() is None
                                                                   or uncertaintyNode.GetImageData() is None)):
        uncertaintyNode = None
    return segmentationNode, volumeNode, uncertaintyNode


def instanceUIDs(volumeNode) -> list[str]:
    """The SOP Instance UIDs Slicer recorded for a volume loaded from DICOM (each once, in order)."""
    text = volumeNode.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) if volumeNode is not None else None
    return list(dict.fromkeys(u for u in (text or "").split() if u))


def _notInDatabase(name: str, missing: int | None, total: int) -> NotFromDicomError:
    what = f"{missing} of the {total}" if missing is not None else "Some of the"
    return NotFromDicomError(f"{what} DICOM images volume {name!r} was loaded from are no longer in Slicer's DICOM "
                             "database (removed, or their files moved), so a DICOM-SEG cannot reference them.",
                             "Import the series into the DICOM database again, or export the segmentation as "
                             ".seg.nrrd and NIfTI files instead.")


def dicomSourceFiles(volumeNode, database: DicomDatabase | None) -> list[str]:
    """The files of the DICOM instances ``volumeNode`` was loaded from; :class:`NotFromDicomError` if it was not."""
    name = volumeNode.GetName()
    uids = instanceUIDs(volumeNode)
    if not uids:
        raise NotFromDicomError(f"Volume {name!r} was not loaded from DICOM (it has no DICOM instance UIDs).")
    if database is None:
        raise NotFromDicomError(f"Volume {name!r} was loaded from DICOM, but Slicer's DICOM database is not open, "
                                "so its images cannot be found.",
                                "Open the database in the DICOM module, or export the segmentation as .seg.nrrd "
                                "and NIfTI files instead.")
    files: list[str] = []
    missing = 0
    for uid in uids:
        path = database.fileForInstance(uid)
        if not path or not os.path.isfile(path):
            missing += 1
            continue
        files.append(str(path))
    if missing:
        raise _notInDatabase(name, missing, len(uids))
    return list(dict.fromkeys(files))  # each file once


def dicomExportAvailability(volumeNode, database: DicomDatabase | None) -> tuple[bool, str]:
    """(possible, reason if not) for the Export DICOM-SEG button: cheap (looks up the first and last instance)."""
    if volumeNode is None:
        return False, "Segment a volume first."
    uids = instanceUIDs(volumeNode)
    if not uids or database is None:
        try:
            dicomSourceFiles(volumeNode, database)
        except NotFromDicomError as exc:
            return False, str(exc)
    probe = [uids[0], uids[-1]] if len(uids) > 1 else uids
    try:
        missing = sum(1 for uid in probe if not database.fileForInstance(uid))
    except Exception as exc:  # a broken database must not break the panel
        log.warning("looking up DICOM instances failed: %s", exc)
        return False, f"Slicer's DICOM database cannot be queried: {exc}"
    if missing:
        return False, str(_notInDatabase(volumeNode.GetName(), None, len(uids)))
    return True, ""


# -- model, segments, label map --------------------------------------------------------------------------


def _attribute(node, key: str) -> str:
    return node.GetAttribute(nodesLib.ATTRIBUTE_PREFIX + key) or ""


def resolveModel(segmentationNode, model=None):
    """The model package the segmentation was made with: ``model`` if given, else the package folder
    recorded on the node, else the installed package of the recorded name. Returns ``(package, notes)``."""
    from MedDiffSegLib.registry import ModelPackage, resolve_model

    notes: list[str] = []
    name = _attribute(segmentationNode, "Model")
    if model is not None:
        package = model if isinstance(model, ModelPackage) else resolve_model(model)
    else:
        package = None
        path = _attribute(segmentationNode, "ModelPath")
        if path and os.path.isdir(path):
            try:
                candidate = ModelPackage.from_folder(path)
            except Exception as exc:  # moved or broken since the run: fall back to the installed name
                log.info("model folder %s recorded on the segmentation cannot be read: %s", path, exc)
                candidate = None
            if candidate is not None and (not name or candidate.name == name):
                package = candidate
        if package is None:
            if not name:
                raise ExportError(f"Segmentation {segmentationNode.GetName()!r} was not made by MedDiffSeg (no model "
                                  "is recorded on it), so the organ codes a DICOM-SEG needs are unknown.")
            package = resolve_model(name)  # ModelError (with what is installed) when it is not
    version = _attribute(segmentationNode, "ModelVersion")
    if version and version != package.version:
        notes.append(f"the segmentation was made with {package.name} {version}; organ names and codes were taken "
                     f"from version {package.version}")
    return package, notes


def organSegments(segmentationNode, package) -> tuple[list[tuple[str, Any]], list[str]]:
    """``[(segment ID, Organ)]`` for the segments that are organs of ``package`` (in the node's order), and notes.

    A segment is an organ when its ID is the organ's name (as MedDiffSeg creates them), or its name
    is the organ's display name or name (a segment re-created by hand).
    """
    segmentation = segmentationNode.GetSegmentation()
    byName = {o.name: o for o in package.organs}
    byDisplayName = {o.display_name: o for o in package.organs}
    chosen: list[tuple[str, Any]] = []
    notes: list[str] = []
    used: set[str] = set()
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        segmentName = segmentation.GetSegment(segmentId).GetName()
        organ = byName.get(segmentId) or byDisplayName.get(segmentName) or byName.get(segmentName)
        if organ is None or organ.name in used:
            why = "a second segment of the same organ" if organ is not None else f"not an organ of model {package.name}"
            notes.append(f"segment {segmentName!r} was left out ({why})")
            continue
        used.add(organ.name)
        chosen.append((segmentId, organ))
    if not chosen:
        raise ExportError(f"Segmentation {segmentationNode.GetName()!r} holds no segment of model {package.name}'s "
                          f"organs ({', '.join(package.organ_names)}); there is nothing to export.")
    return chosen, notes


def labelArray(segmentationNode, volumeNode, segmentIds: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Label map ``[K, J, I]`` on ``volumeNode``'s grid: label ``i`` = ``segmentIds[i-1]``; and notes.

    Each segment is exported from the segmentation node in the volume's geometry (Slicer's
    segmentations logic). Where segments overlap, the later one is kept and a note says so. The
    temporary nodes that export adds to the scene are all removed again.
    """
    slicer = _slicer()
    scene = slicer.mrmlScene
    before = set(nodesLib.nodeIDs(scene))
    try:
        return _labelArray(slicer, segmentationNode, volumeNode, segmentIds)
    finally:
        for nodeID in [i for i in nodesLib.nodeIDs(scene) if i not in before]:
            node = scene.GetNodeByID(nodeID)
            if node is not None:
                scene.RemoveNode(node)


def _labelArray(slicer, segmentationNode, volumeNode, segmentIds: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    shape = tuple(reversed(dimensions(volumeNode)))
    labels = np.zeros(shape, dtype=np.uint8 if len(segmentIds) < 256 else np.uint16)
    segmentation = segmentationNode.GetSegmentation()
    notes: list[str] = []
    for label, segmentId in enumerate(segmentIds, start=1):
        segmentName = segmentation.GetSegment(segmentId).GetName()
        try:
            mask = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)) != 0
        except RuntimeError as exc:
            raise ExportError(f"segment {segmentName!r} cannot be exported on the grid of volume "
                              f"{volumeNode.GetName()!r}: {exc}") from exc
        if mask.shape != shape:
            raise ExportError(f"segment {segmentName!r} was exported with shape {mask.shape}, the volume has {shape}")
        overlap = mask & (labels != 0)
        if overlap.any():
            others = ", ".join(repr(segmentation.GetSegment(segmentIds[int(v) - 1]).GetName())
                               for v in np.unique(labels[overlap]))
            notes.append(f"segment {segmentName!r} overlaps {others} in {int(overlap.sum())} voxel(s); a label map "
                         f"holds one segment per voxel, so {segmentName!r} was kept there")
        labels[mask] = label
    return labels, notes


# -- writing, all or nothing -----------------------------------------------------------------------------


def _firstMissingAncestor(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None: it exists)."""
    missing = None
    p = folder.absolute()
    while not p.exists():
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing


def _removeQuietly(paths: Sequence[Path], folder: Path | None = None) -> None:
    for p in paths:
        try:
            Path(p).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - report, keep cleaning
            log.warning("could not remove %s: %s", p, exc)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _refuseOverwrite(targets: Sequence[Path], overwrite: bool) -> None:
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} already exist(s); choose another folder (nothing was written)")
    for t in targets:
        if t.is_dir():
            raise ExportError(f"cannot write {t}: it is a folder")


def exportDicom(segmentationNode, volumeNode, database: DicomDatabase | None, outputFolder=None, *,
                uncertaintyNode=None, model=None, seriesDescription: str | None = None, allowEmpty: bool = False,
                addToDatabase: bool = True, overwrite: bool = False, tempRoot: str | None = None,
                sourceFiles: Sequence[str] | None = None) -> ExportReport:
    """Write the DICOM-SEG (and the Parametric Map of ``uncertaintyNode``) of ``segmentationNode`` and add them
    to ``database``.

    ``outputFolder``: where the files go (``segmentation.dcm``, ``uncertainty_pmap.dcm``); None: a new
    folder under ``tempRoot`` (the database keeps its own copies). ``sourceFiles``: the series' files
    when already looked up (:func:`dicomSourceFiles`). Raises :class:`NotFromDicomError`
    when the volume is not from the database, the library's errors (geometry mismatch, empty
    segmentation, ...) or :class:`ExportError`; in every case nothing of this export is left behind.
    """
    from MedDiffSegLib.dicom import export_dicom

    files = list(sourceFiles) if sourceFiles else dicomSourceFiles(volumeNode, database)
    package, notes = resolveModel(segmentationNode, model)
    chosen, more = organSegments(segmentationNode, package)
    notes += more
    labels, more = labelArray(segmentationNode, volumeNode, [segmentId for segmentId, _ in chosen])
    notes += more
    labelImage = imageFromArray(labels, volumeNode)
    uncertaintyImage = imageFromVolumeNode(uncertaintyNode) if uncertaintyNode is not None else None
    parameters = {k.lower(): _attribute(segmentationNode, k) for k in ("Samples", "Seed")}

    if outputFolder is None:
        folder = Path(tempfile.mkdtemp(prefix="MedDiffSeg-DICOM-", dir=tempRoot))
        created: Path | None = folder
    else:
        folder = Path(outputFolder)
        created = _firstMissingAncestor(folder)
    segPath = folder / SEG_FILE
    pmapPath = folder / PMAP_FILE if uncertaintyImage is not None else None
    if outputFolder is not None:
        _refuseOverwrite([p for p in (segPath, pmapPath) if p is not None], overwrite)

    records: list[Any] = []
    importing = False
    try:
        records = export_dicom(labelImage, files, [organ for _, organ in chosen], segPath, uncertainty=uncertaintyImage,
                               pmap_path=pmapPath, model_name=package.name, model_version=package.version,
                               series_description=seriesDescription, allow_empty=allowEmpty,
                               algorithm_parameters={k: v for k, v in parameters.items() if v})
        if addToDatabase:
            if database is None:  # pragma: no cover - dicomSourceFiles needed it already
                raise ExportError("no DICOM database to add the files to")
            importing = True
            database.importFiles([str(r.path) for r in records])
            notFound = [r.path.name for r in records if not database.fileForInstance(r.sop_instance_uid)]
            if notFound:
                raise ExportError(f"the DICOM database did not take {', '.join(notFound)} (see the log for details)")
    except BaseException:
        if importing:
            _forgetSeries(database, records)
        _removeQuietly([r.path for r in records], created)
        raise
    for r in records:
        notes += [n for n in r.notes if n not in notes]
    return ExportReport(dicom=True, paths=[Path(r.path) for r in records], notes=notes,
                        segments=list(records[0].segments), records=records, addedToDatabase=addToDatabase,
                        model=f"{package.name} {package.version}")


def _forgetSeries(database, records) -> None:
    """Undo a partial import where the database can (``removeSeries``); never raises."""
    remove = getattr(database, "removeSeries", None)
    if remove is None:
        return
    for uid in dict.fromkeys(r.series_instance_uid for r in records):
        try:
            remove(uid)
        except Exception as exc:  # pragma: no cover - best effort
            log.warning("could not remove series %s from the DICOM database: %s", uid, exc)


def safeFileName(name: str, default: str = "segmentation") -> str:
    """``name`` usable as a file name on every platform (other characters become ``_``)."""
    text = re.sub(r"[^A-Za-z0-9._ -]+", "_", str(name)).strip(" ._")
    return text or default


def exportFiles(segmentationNode, volumeNode, outputFolder, *, uncertaintyNode=None, baseName: str | None = None,
                overwrite: bool = False, explanation: str = "") -> ExportReport:
    """Write ``BASE.seg.nrrd`` (the segmentation node as is), ``BASE_labels.nii.gz`` (label ``i`` = the
    node's ``i``-th segment, on the volume's grid) and ``BASE_uncertainty.nii.gz`` into ``outputFolder``.

    All three are written into a staging folder first (storage nodes outside the scene) and moved
    into place only when all succeeded; a failure leaves none of them (nor a folder it created).
    """
    slicer = _slicer()
    folder = Path(outputFolder)
    base = safeFileName(baseName or segmentationNode.GetName())
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not segmentIds:
        raise ExportError(f"Segmentation {segmentationNode.GetName()!r} holds no segment; there is nothing to export.")
    targets = {"seg": folder / f"{base}.seg.nrrd", "labels": folder / f"{base}_labels.nii.gz"}
    if uncertaintyNode is not None:
        targets["uncertainty"] = folder / f"{base}_uncertainty.nii.gz"
    _refuseOverwrite(list(targets.values()), overwrite)
    labels, notes = labelArray(segmentationNode, volumeNode, segmentIds)
    names = [segmentation.GetSegment(s).GetName() for s in segmentIds]
    notes.append(f"label values in {targets['labels'].name}: "
                 + ", ".join(f"{i} = {name}" for i, name in enumerate(names, start=1)))

    created = _firstMissingAncestor(folder)
    moved: list[Path] = []
    staging: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".MedDiffSeg-export-", dir=folder))
        staged = {key: staging / target.name for key, target in targets.items()}
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(staged["seg"]))
        if not storage.WriteData(segmentationNode):
            raise ExportError(f"could not write {targets['seg'].name}")
        labelNode = slicer.vtkMRMLLabelMapVolumeNode()  # never added to the scene
        slicer.util.updateVolumeFromArray(labelNode, labels)
        copyGeometry(volumeNode, labelNode)
        nodesLib.writeVolumeNode(labelNode, str(staged["labels"]), compress=True)
        if uncertaintyNode is not None:
            nodesLib.writeVolumeNode(uncertaintyNode, str(staged["uncertainty"]), compress=True)
        for key, target in targets.items():
            os.replace(staged[key], target)
            moved.append(target)
    except BaseException as exc:
        _removeQuietly(moved, created)
        if isinstance(exc, OSError):
            text = str(exc.strerror or exc)
            if staging is not None:  # name the file the user asked for, not the staging copy
                text = text.replace(str(staging), str(folder))
            raise ExportError(f"could not write into {folder}: {text}") from exc
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(dicom=False, paths=list(targets.values()), explanation=explanation, notes=notes,
                        segments=[{"number": i, "name": s, "label": segmentation.GetSegment(s).GetName()}
                                  for i, s in enumerate(segmentIds, start=1)])


def exportResult(result, database: DicomDatabase | None, outputFolder=None, *, volumeNode=None, uncertaintyNode=None,
                 includeUncertainty: bool = True, model=None, seriesDescription: str | None = None,
                 allowEmpty: bool = False, addToDatabase: bool = True, overwrite: bool = False,
                 tempRoot: str | None = None) -> ExportReport:
    """DICOM-SEG (+ Parametric Map) into ``database`` when the volume is from DICOM; otherwise, given
    ``outputFolder``, ``.seg.nrrd`` + NIfTI files there with ``explanation`` saying why (without a
    folder, :class:`NotFromDicomError` carries the explanation)."""
    segmentationNode, volumeNode, uncertaintyNode = resultNodes(result, volumeNode, uncertaintyNode, includeUncertainty)
    try:
        files = dicomSourceFiles(volumeNode, database)
    except NotFromDicomError as exc:
        if outputFolder is None:
            raise
        return exportFiles(segmentationNode, volumeNode, outputFolder, uncertaintyNode=uncertaintyNode,
                           overwrite=overwrite, explanation=f"{exc.reason} {FALLBACK_NOTE}")
    return exportDicom(segmentationNode, volumeNode, database, outputFolder, uncertaintyNode=uncertaintyNode,
                       model=model, seriesDescription=seriesDescription, allowEmpty=allowEmpty,
                       addToDatabase=addToDatabase, overwrite=overwrite, tempRoot=tempRoot, sourceFiles=files)
