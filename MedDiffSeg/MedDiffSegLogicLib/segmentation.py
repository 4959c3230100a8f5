"""One segmentation of a volume node, in this process or in a worker process (no Qt).

Both paths end in :func:`buildResultNodes`, which turns a label map and an uncertainty map on the
input's voxel grid into a segmentation node and an uncertainty volume node, inside a
:class:`~.nodes.SceneTransaction`: nothing is added to the scene before all computing is done, and
a failure while building removes whatever was added.

Before either runs, the volume's modality (:mod:`.modality`: its DICOM Modality tag, else its
intensities) chooses the default model when none is named, and is checked against the model's:
a mismatch raises :class:`~MedDiffSegLib.errors.ModalityMismatchError` unless
``SegmentOptions.allowModalityMismatch``.

- :func:`segmentInProcess` converts the node to a SimpleITK image (exact geometry) and calls the
  library's ``segment_volume`` directly (tests, scripts, batch jobs in Slicer's Python console).
- :class:`BackgroundSegmentation` writes the volume through a storage node into a temporary
  folder, runs ``python -m MedDiffSegLib.inference.worker`` through a :class:`~.process.ProcessRunner`,
  parses its JSON progress lines on each :meth:`~BackgroundSegmentation.poll`, and reads the
  outputs back through storage nodes. :meth:`~BackgroundSegmentation.cancel` kills the worker's
  process group and removes the temporary folder; the scene is not touched until
  :meth:`~BackgroundSegmentation.loadResults`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import modality as modalityLib
from . import nodes as nodesLib
from .geometry import imageFromVolumeNode, lpsToRas
from .process import ProcessRunner, SubprocessRunner, protocolEvents, workerCommand, workerEnvironment
from .progress import ProgressTracker, parseWorkerLine

log = logging.getLogger(__name__)

SEGMENTATION_FILE = "segmentation.nii.gz"
UNCERTAINTY_FILE = "uncertainty.nii.gz"
INPUT_FILE = "input.nrrd"
REQUEST_FILE = "request.json"


# -- options and results ---------------------------------------------------------------------------


@dataclass
class SegmentOptions:
    """What to segment and how; ``None`` means the model's default."""

    organs: list[str]
    model: Any = None  # installed name, package folder, ModelPackage, or None for the default model
    samples: int | None = None
    steps: int | None = None
    seed: int = 0
    device: str = "auto"
    scheduler: str | None = None
    staple: bool = False
    largestComponent: bool = False
    allowModalityMismatch: bool = False  # run a model made for another modality than the volume's

    def resolvePackage(self, modality: str | None = None):
        """The model package (a ``ModelPackage``: imports torch), validated: organs known to it; without a
        model, the default model for ``modality`` (the volume's; CT when not given)."""
        return self._resolve(modality, metadataOnly=False)

    def resolvePackageInfo(self, modality: str | None = None):
        """:meth:`resolvePackage` as a torch-free ``PackageInfo`` (read from model.json): what the Slicer
        process needs to start a worker, which loads the model itself."""
        return self._resolve(modality, metadataOnly=True)

    def _resolve(self, modality: str | None, metadataOnly: bool):
        from MedDiffSegLib.errors import ModelError
        from MedDiffSegLib.registry import default_package_info, package_info, read_package_info

        model = self.model
        if isPackage(model):
            if metadataOnly:
                package = model if hasattr(model, "load") else read_package_info(model.path)
            else:
                package = model.load() if hasattr(model, "load") else model
        else:
            if model in (None, ""):
                package = default_package_info(modality or "CT")
            else:
                package = package_info(str(model))
            if not metadataOnly:
                package = package.load()
        organs = [self.organs] if isinstance(self.organs, str) else list(self.organs or [])
        if not organs:
            raise ModelError(f"choose at least one organ; model {package.name!r} segments: {', '.join(package.organ_names)}")
        package.organ_ids(organs)  # raises ModelError naming unknown organs
        return package

    def request(self, inputPath: str, outDir: str, package, modality: str | None = None) -> dict[str, Any]:
        """The worker's request (model given as its package folder: no second lookup in the worker).

        ``modality``: what the volume is when its DICOM tag says so (the worker's input file has no tag).
        """
        return {
            "input": str(inputPath), "out_dir": str(outDir), "organs": list(self.organs),
            "model": str(Path(package.path).absolute()), "samples": self.samples, "steps": self.steps,
            "seed": int(self.seed), "device": self.device, "scheduler": self.scheduler,
            "staple": bool(self.staple),
            # unchecked: the model's own choice per organ (None), not "never"
            "largest_component": True if self.largestComponent else None,
            "modality": modality, "allow_modality_mismatch": bool(self.allowModalityMismatch),
            "watch_pid": os.getpid(),  # the worker stops when this process (Slicer) dies
        }


@dataclass
class MedDiffSegResult:
    """What a segmentation left in the scene, and its numbers."""

    volumeNode: Any
    segmentationNode: Any
    uncertaintyNode: Any
    segmentIds: dict[str, str]
    organs: list[dict[str, Any]]  # per organ: name, display_name, label, volume_ml, mean_uncertainty, ...
    summary: dict[str, Any]
    device: str = ""
    durationSeconds: float = 0.0

    def organ(self, name: str) -> dict[str, Any]:
        for o in self.organs:
            if name in (o.get("name"), o.get("display_name")):
                return o
        raise KeyError(name)

    @property
    def samples(self) -> int | None:
        """How many diffusion samples the run drew (None when the summary does not say)."""
        try:
            return int(self.summary.get("settings", {}).get("samples"))
        except (TypeError, ValueError):
            return None

    @property
    def hasUncertainty(self) -> bool:
        """False for a one-sample run: a single sample cannot disagree with itself, its map is all zeros."""
        return self.samples is None or self.samples > 1

    def mostUncertainRAS(self, name: str) -> tuple[float, float, float] | None:
        """RAS centre of the slice where ``name``'s samples disagree most (None: they agree everywhere)."""
        position = self.organ(name).get("max_uncertainty_position_mm")
        return lpsToRas(position) if position else None

    def possibleMisses(self, name: str) -> list[dict[str, Any]]:
        """Runs of slices where ``name`` probably continues unsegmented (the summary's ``possible_continuation``:
        beyond the mask's first/last slice, gaps inside it, or the whole organ when nothing was segmented)."""
        return list(self.organ(name).get("possible_continuation") or [])

    @property
    def hasReviewTarget(self) -> bool:
        """Whether "jump to the slice to review" has somewhere to go: samples that can disagree, or a possible miss."""
        return self.hasUncertainty or any(self.possibleMisses(o.get("name")) for o in self.organs)

    def reviewTarget(self, name: str) -> tuple[tuple[float, float, float] | None, str]:
        """Where to look first for ``name``: ``(RAS point, "missed" | "uncertain")``, or ``(None, "")``.

        A possible miss comes first (the samples agree there, so the variance cannot show it): the peak
        slice of the run with the largest probability-weighted area. Otherwise the most uncertain slice.
        """
        runs = [r for r in self.possibleMisses(name) if r.get("peak_position_mm")]
        if runs:
            best = max(runs, key=lambda r: max(r.get("area_mm2") or [0.0]))
            return lpsToRas(best["peak_position_mm"]), "missed"
        if self.hasUncertainty:
            ras = self.mostUncertainRAS(name)
            if ras is not None:
                return ras, "uncertain"
        return None, ""


def isPackage(model) -> bool:
    """Whether ``model`` is a package object (a ``ModelPackage`` or a ``PackageInfo``), not a name or a path."""
    return all(hasattr(model, a) for a in ("path", "name", "organ_ids", "weights_sha256"))


def _packagePath(package) -> str | None:
    path = getattr(package, "path", None)
    return str(Path(path).absolute()) if path else None


def _organDicts(package, organNames: Sequence[str]) -> list[dict[str, Any]]:
    return [package.organs[i].to_dict() for i in package.organ_ids(list(organNames))]


def _setResultAttributes(segmentationNode, uncertaintyNode, summary: dict[str, Any], modelPath: str | None = None,
                         volumeNode=None) -> None:
    model = summary.get("model", {})
    settings = summary.get("settings", {})
    for node in (segmentationNode, uncertaintyNode):
        node.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Model", str(model.get("name", "")))
        node.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "ModelVersion", str(model.get("version", "")))
        if modelPath:  # the package folder used for the run (DICOM export reads its organ codes again)
            node.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "ModelPath", str(modelPath))
        node.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Samples", str(settings.get("samples", "")))
        node.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Seed", str(settings.get("seed", "")))
        node.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Summary", json.dumps(summary, default=str))
    segmentationNode.SetNodeReferenceID(nodesLib.UNCERTAINTY_REFERENCE, uncertaintyNode.GetID())
    if volumeNode is not None:
        segmentationNode.SetNodeReferenceID(nodesLib.INPUT_REFERENCE, volumeNode.GetID())


def resultFromNodes(segmentationNode) -> MedDiffSegResult | None:
    """The result a segmentation node holds, rebuilt from what the scene saved (its summary attribute and
    its references to the uncertainty and input volumes); None when it is not a complete MedDiffSeg result.
    After a scene is loaded this gives back the results table, jump-to-slice and the overlay."""
    if segmentationNode is None:
        return None
    try:
        summary = json.loads(segmentationNode.GetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Summary") or "null")
    except json.JSONDecodeError:
        return None
    uncertaintyNode = segmentationNode.GetNodeReference(nodesLib.UNCERTAINTY_REFERENCE)
    volumeNode = segmentationNode.GetNodeReference(nodesLib.INPUT_REFERENCE)
    if not isinstance(summary, dict) or uncertaintyNode is None or volumeNode is None:
        return None
    organs = [o for o in summary.get("organs", []) if isinstance(o, dict) and o.get("name")]
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = {o["name"]: o["name"] for o in organs if segmentation.GetSegment(o["name"]) is not None}
    timings = summary.get("timings_s") or {}
    return MedDiffSegResult(volumeNode=volumeNode, segmentationNode=segmentationNode, uncertaintyNode=uncertaintyNode,
                            segmentIds=segmentIds, organs=organs, summary=summary,
                            device=str(summary.get("settings", {}).get("device", "")),
                            durationSeconds=float(timings.get("total", 0.0) or 0.0))


def buildResultNodes(volumeNode, labels_kji: np.ndarray, uncertainty_kji: np.ndarray, organs: Sequence[dict],
                     summary: dict[str, Any], *, segmentationNode=None, colorMap: str = nodesLib.DEFAULT_COLOR_MAP,
                     durationSeconds: float = 0.0, modelPath: str | None = None) -> MedDiffSegResult:
    """Segmentation + uncertainty nodes for one result, all-or-nothing (see the module docstring)."""
    scene = volumeNode.GetScene()
    name = volumeNode.GetName() or "volume"
    with nodesLib.SceneTransaction(scene) as transaction:
        uncertaintyNode = nodesLib.createUncertaintyNode(
            scene, volumeNode, uncertainty_kji, scene.GenerateUniqueName(f"{name} uncertainty"), colorMap)
        if segmentationNode is None:
            segmentationNode = nodesLib.createSegmentationNode(scene, volumeNode,
                                                               scene.GenerateUniqueName(f"{name} MedDiffSeg"))
        else:
            transaction.protectSegmentation(segmentationNode)
        segmentIds = nodesLib.fillSegmentation(segmentationNode, volumeNode, labels_kji, organs)
        _setResultAttributes(segmentationNode, uncertaintyNode, summary, modelPath, volumeNode)
    return MedDiffSegResult(
        volumeNode=volumeNode, segmentationNode=segmentationNode, uncertaintyNode=uncertaintyNode,
        segmentIds=segmentIds, organs=list(summary.get("organs", [])), summary=summary,
        device=str(summary.get("settings", {}).get("device", "")), durationSeconds=float(durationSeconds),
    )


# -- in this process -------------------------------------------------------------------------------------


def _checkInputVolume(volumeNode) -> None:
    if volumeNode is None:
        raise ValueError("choose an input volume")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode") or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError(f"{volumeNode.GetName()!r} is not a grey-level scalar volume; choose a CT or MR image")
    if volumeNode.GetImageData() is None:
        raise ValueError(f"volume {volumeNode.GetName()!r} holds no image data")


def _fittingModels(modality: str) -> list[str]:
    from MedDiffSegLib.registry import list_package_infos, models_for_modality

    return [p.name for p in models_for_modality(modality, list_package_infos())]


def _defaultDatabase(volumeNode):
    """Slicer's DICOM database for a volume loaded from DICOM (None otherwise, or without one)."""
    from .dicomexport import SlicerDicomDatabase, instanceUIDs

    if not instanceUIDs(volumeNode):
        return None
    try:
        return SlicerDicomDatabase.fromApplication()
    except Exception as exc:  # no application (scripts, tests): the intensities decide
        log.debug("no DICOM database: %s", exc)
        return None


def prepareModality(volumeNode, options: SegmentOptions, database=None, metadataOnly: bool = False):
    """(the volume's modality, the model package) for a run: the named model, or the default model for
    the volume's modality when none is named. Raises (ModelError) before anything is computed or added.
    ``metadataOnly``: a torch-free ``PackageInfo`` instead of the ``ModelPackage``."""
    volume = modalityLib.volumeModality(volumeNode, database if database is not None else _defaultDatabase(volumeNode))
    package = options.resolvePackageInfo(volume.modality) if metadataOnly else options.resolvePackage(volume.modality)
    return volume, package


def inProcessSummary(result, package, durationSeconds: float, modalityCheck=None) -> dict[str, Any]:
    """The same shape as the pipeline's ``summary.json`` for the parts the module uses."""
    from MedDiffSegLib import __version__
    from MedDiffSegLib.inference import device_description
    from MedDiffSegLib.registry import package_origin

    data = result.to_dict()
    summary = {
        "organs": data["organs"],
        "model": {"name": package.name, "version": package.version, "method": package.method_name,
                  "weights_sha256": package.weights_sha256, "origin": package_origin(package),
                  "modality": package.modality},
        "settings": {"samples": result.samples, "steps": result.steps, "scheduler": result.scheduler,
                     "seed": result.seed, "threshold": result.threshold, "staple": result.staple,
                     "largest_component": result.largest_component, "device": device_description(result.device)},
        "timings_s": {k: round(float(v), 4) for k, v in data["timings"].items()} | {"total": round(durationSeconds, 4)},
        "software": {"meddiffseg": __version__},
    }
    if modalityCheck is not None:
        summary["input"] = {"modality": modalityCheck.input_modality, "modality_source": modalityCheck.input_source}
        summary["modality_check"] = modalityCheck.to_dict()
    return summary


def segmentInProcess(volumeNode, options: SegmentOptions, *, segmentationNode=None,
                     colorMap: str = nodesLib.DEFAULT_COLOR_MAP,
                     progress: Callable[[str, float, str], None] | None = None,
                     shouldCancel: Callable[[], bool] | None = None, database=None) -> MedDiffSegResult:
    """Segment ``volumeNode`` here and now; see :class:`SegmentOptions`. Raises the library's errors
    (``Cancelled`` when ``shouldCancel()`` turns true; ``ModalityMismatchError`` when the model is made
    for another modality than the volume's) without adding anything to the scene. ``database``: where
    a DICOM volume's files are found for its Modality tag (default: Slicer's)."""
    from MedDiffSegLib.inference import resolve_device, segment_volume

    t0 = time.perf_counter()
    _checkInputVolume(volumeNode)
    volume, package = prepareModality(volumeNode, options, database)
    device = resolve_device(options.device)
    modalityCheck = modalityLib.checkVolume(package, volume, volumeNode, allowMismatch=bool(options.allowModalityMismatch),
                                            fittingModels=_fittingModels)
    image = imageFromVolumeNode(volumeNode)
    result = segment_volume(
        image, package, list(options.organs), samples=options.samples, steps=options.steps, seed=int(options.seed),
        device=device, scheduler=options.scheduler, staple=bool(options.staple),
        largest_component=True if options.largestComponent else None, progress=progress, should_cancel=shouldCancel,
    )
    if shouldCancel is not None and shouldCancel():
        from MedDiffSegLib.errors import Cancelled

        raise Cancelled("segmentation cancelled")
    from MedDiffSegLib.io import array_view

    labels = array_view(result.labels)  # each view holds its image, whatever happens to ``result``
    uncertainty = array_view(result.uncertainty)
    duration = time.perf_counter() - t0
    summary = inProcessSummary(result, package, duration, modalityCheck)
    return buildResultNodes(volumeNode, labels, uncertainty, _organDicts(package, options.organs), summary,
                            segmentationNode=segmentationNode, colorMap=colorMap, durationSeconds=duration,
                            modelPath=_packagePath(package))


# -- in a worker process ---------------------------------------------------------------------------------


class BackgroundSegmentation:
    """One segmentation in a worker process: :meth:`start`, :meth:`poll` until :attr:`finished`, then
    :meth:`loadResults` (or :meth:`cancel` at any time).

    States: ``created`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled``; ``loaded``
    after :meth:`loadResults`. :attr:`errorMessage` is for the user, :attr:`errorDetails` for the log.
    """

    def __init__(self, volumeNode, options: SegmentOptions, *, segmentationNode=None,
                 colorMap: str = nodesLib.DEFAULT_COLOR_MAP, runner: ProcessRunner | None = None,
                 python: str | None = None, pythonPath: Sequence[str] = (), tempRoot: str | None = None,
                 clock: Callable[[], float] = time.monotonic, database=None):
        self.volumeNode = volumeNode
        self.options = options
        self.segmentationNode = segmentationNode
        self.colorMap = colorMap
        self.runner: ProcessRunner = runner or SubprocessRunner()
        self.python = python
        self.pythonPath = list(pythonPath)
        self.tempRoot = tempRoot
        self.database = database
        self.volumeModality: modalityLib.VolumeModality | None = None
        self.tracker = ProgressTracker(clock)
        self.state = "created"
        self.tempDir: Path | None = None
        self.package = None
        self.summary: dict[str, Any] | None = None
        self.errorMessage = ""
        self.errorKind = ""
        self.errorDetails = ""
        self.logLines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.result: MedDiffSegResult | None = None
        self._started = 0.0
        self._clock = clock

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled", "loaded")

    @property
    def outDir(self) -> Path:
        assert self.tempDir is not None
        return self.tempDir / "out"

    def start(self) -> None:
        """Validate, write the input, start the worker. Errors are raised here (nothing is left behind)."""
        if self.state != "created":
            raise RuntimeError(f"this segmentation was already started (state {self.state})")
        _checkInputVolume(self.volumeNode)
        self.volumeModality, self.package = prepareModality(self.volumeNode, self.options, self.database,
                                                            metadataOnly=True)  # no torch in this process
        # the worker checks again on the file it reads; checking here fails before a process starts
        modalityLib.checkVolume(self.package, self.volumeModality, self.volumeNode,
                                allowMismatch=bool(self.options.allowModalityMismatch), fittingModels=_fittingModels)
        self.tempDir = Path(tempfile.mkdtemp(prefix="MedDiffSeg-", dir=self.tempRoot))
        try:
            inputPath = self.tempDir / INPUT_FILE
            nodesLib.writeVolumeNode(self.volumeNode, str(inputPath))
            requestPath = self.tempDir / REQUEST_FILE
            request = self.options.request(str(inputPath), str(self.outDir), self.package,
                                           modality=self.volumeModality.declaredForWorker())
            requestPath.write_text(json.dumps(request, indent=2), encoding="utf-8")
            self._started = self._clock()
            self.runner.start(workerCommand(str(requestPath), self.python), env=workerEnvironment(self.pythonPath),
                              cwd=str(self.tempDir))
        except BaseException:
            self.cleanup()
            raise
        self.state = "running"

    def poll(self) -> list[dict[str, Any]]:
        """Read what the worker said since the last call; update :attr:`state` when it has exited."""
        if self.state != "running":
            return []
        new = self._readEvents()
        code = self.runner.poll()
        if code is None:
            return new
        new += self._readEvents()  # lines written just before exiting
        if code == 0 and self.summary is not None:
            self.state = "succeeded"
        elif self.errorKind == "Cancelled" or code == 130:
            self.state = "cancelled"
            self.cleanup()
        else:
            self.state = "failed"
            if not self.errorMessage:
                self.errorMessage = f"the segmentation process ended unexpectedly (exit status {code})"
            stderr = self.runner.errorText().strip()
            if stderr:
                self.errorDetails = (self.errorDetails + "\n" if self.errorDetails else "") + stderr
            self.cleanup()
        return new

    def _readEvents(self) -> list[dict[str, Any]]:
        new = []
        for event in protocolEvents(self.runner, parseWorkerLine, self.logLines):
            self.tracker.update(event)
            if event["type"] == "done":
                self.summary = event.get("summary") or {}
            elif event["type"] == "error":
                self.errorKind = str(event.get("kind", ""))
                self.errorMessage = event["message"]
                self.errorDetails = str(event.get("details", ""))
            new.append(event)
        self.events.extend(new)
        return new

    def cancel(self, grace: float = 0.5, wait: bool = True) -> None:
        """Stop the worker and every process it started; remove the temporary folder. Scene untouched.

        ``wait=False`` (the Widget) returns at once: the job is ``cancelled`` now, and a background
        thread ends the process tree (SIGTERM, SIGKILL after ``grace`` seconds) and removes the folder;
        :meth:`waitStopped` waits for that.
        """
        running = self.state in ("running", "created")
        if running:
            self.state = "cancelled"

        def finish() -> None:
            try:
                if running:
                    self.runner.terminate(grace)
            finally:
                self.cleanup()

        if wait:
            finish()
        else:
            self._stopper = threading.Thread(target=finish, name="MedDiffSeg-cancel", daemon=True)
            self._stopper.start()

    def waitStopped(self, timeout: float | None = None) -> bool:
        """After ``cancel(wait=False)``: wait until the process tree is gone and the folder removed."""
        stopper = getattr(self, "_stopper", None)
        if stopper is not None:
            stopper.join(timeout)
            return not stopper.is_alive()
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05,
             onEvent: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Poll until finished (scripts and tests; the Widget polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            for event in self.poll():
                if onEvent is not None:
                    onEvent(event)
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"segmentation still running after {timeout} s")
            time.sleep(interval)
        return self.state

    def loadResults(self) -> MedDiffSegResult:
        """Read the worker's outputs into new nodes (through storage nodes), then remove the temporary folder."""
        if self.state != "succeeded":
            raise RuntimeError(f"no results to load (state {self.state}): {self.errorMessage}")
        try:
            labels, labelsMatrix, labelsDims = nodesLib.readVolumeFile(str(self.outDir / SEGMENTATION_FILE), label=True)
            nodesLib.checkSameGrid(self.volumeNode, labelsDims, labelsMatrix, "the segmentation read back")
            uncertainty, uncMatrix, uncDims = nodesLib.readVolumeFile(str(self.outDir / UNCERTAINTY_FILE))
            nodesLib.checkSameGrid(self.volumeNode, uncDims, uncMatrix, "the uncertainty map read back")
            summary = dict(self.summary or {})
            organNames = [o["name"] for o in summary.get("organs", [])] or list(self.options.organs)
            duration = self._clock() - self._started
            self.result = buildResultNodes(
                self.volumeNode, labels, uncertainty, _organDicts(self.package, organNames), summary,
                segmentationNode=self.segmentationNode, colorMap=self.colorMap, durationSeconds=duration,
                modelPath=_packagePath(self.package))
        finally:
            self.cleanup()
        self.state = "loaded"
        return self.result

    def cleanup(self) -> None:
        if self.tempDir is not None:
            shutil.rmtree(self.tempDir, ignore_errors=True)
            self.tempDir = None
