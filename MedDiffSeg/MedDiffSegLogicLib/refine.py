"""Refine mode on a result in the scene: Markups tools, the persistent worker, its updates (no Qt, no torch).

A :class:`RefineController` binds one result (input volume, segmentation node, uncertainty volume) to
a :class:`~.refineworker.RefineWorker`:

- **Tools**: per organ, a Markups point list for positive clicks ("this is the organ") and one for
  negative clicks ("this is not"), and a Markups ROI per box; :meth:`~RefineController.placePoints`
  and :meth:`~RefineController.placeBox` put Slicer in place mode for them. Every point or box the
  user places becomes one correction, sent to the worker in world coordinates converted to the
  volume's own LPS (Slicer's RAS with x and y negated, through the inverse of the volume's parent
  transform). A point outside the volume (e.g. placed in the 3D view), a box that misses it, or a
  click on a locked organ is removed again with a message; nothing is sent.
- **Updates**: a reply carries the corrected organ's mask and the uncertainty on the slices the
  correction reached; only that organ's segment and those slices of the uncertainty volume are
  rewritten (:func:`replaceSegmentSlab`, :func:`replaceVolumeSlab`), and the organ's volume and mean
  uncertainty in the result's summary are recounted.
- **Undo and redo** run in the worker's session, which keeps the exact voxels before and after each
  correction; the controller applies what it sends back and takes the correction's point or box off
  the views (undo) or puts it back (redo).
- **Locks**: a locked organ is refused here and in the worker.
- **Suggestions**: where a click would help most, from the uncertainty, after every correction (and
  on request), as one locked Markups point list whose labels give the organ, the click's sign and the
  confidence.

Deferred work: Markups events only record what happened; :attr:`~RefineController.schedule` runs the
handling later (the Widget passes ``qt.QTimer.singleShot(0, f)``; the default runs it at once).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import nodes as nodesLib
from .geometry import (dimensions, ijkToRasArray, insideVolume, lpsGeometry, lpsToRas, rasToIjk, rasToLps,
                       volumeArray, volumeRasToWorld, worldToVolumeRas)
from .refineworker import RefineWorker, refineAvailability

log = logging.getLogger(__name__)

#: Node attribute marking the Markups nodes of Refine mode (value: positive, negative, box or suggestions).
TOOL_ATTRIBUTE = nodesLib.ATTRIBUTE_PREFIX + "RefineTool"
NEGATIVE_COLOR = (0.15, 0.35, 1.0)
SUGGESTION_COLOR = (1.0, 0.85, 0.0)
BOX_COLOR = (1.0, 1.0, 1.0)
SUGGESTIONS = 3


def _slicer():
    import slicer

    return slicer


# -- which model, and can it refine ------------------------------------------------------------------------


def refineModel(result) -> tuple[str | None, str]:
    """``(package folder or None, why not)`` for refining ``result``: the folder recorded on its segmentation
    when it is still there, else the installed package of the recorded name - when its weights are the
    ones that made the result."""
    from MedDiffSegLib.registry import package_info

    summary = result.summary or {}
    model = summary.get("model") or {}
    name = result.segmentationNode.GetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Model") or model.get("name") or ""
    sha = str(model.get("weights_sha256") or "").lower()
    path = result.segmentationNode.GetAttribute(nodesLib.ATTRIBUTE_PREFIX + "ModelPath") or ""
    if path and (Path(path) / "model.json").is_file():
        try:
            recorded = json.loads((Path(path) / "model.json").read_text(encoding="utf-8"))
            if (not name or recorded.get("name") == name) and (not sha or str(recorded.get("weights_sha256")).lower() == sha):
                return path, ""
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    if not name:
        return None, "This segmentation was not made by MedDiffSeg (no model is recorded on it): it cannot be refined."
    try:
        info = package_info(name)
    except Exception as exc:
        return None, f"The model that made this result ({name}) is not installed: {exc}"
    if sha and info.weights_sha256 != sha:
        return None, (f"The installed {info.name} ({info.version}) is not the model that made this result "
                      f"({model.get('version', '?')}): segment again with it to refine.")
    return str(info.path), ""


def resultRefineAvailability(result) -> tuple[bool, str]:
    """``(True, "")`` when ``result`` can be refined, else ``(False, why)``."""
    if result is None:
        return False, "Segment a volume first."
    for node, what in ((result.volumeNode, "input volume"), (result.segmentationNode, "segmentation"),
                       (result.uncertaintyNode, "uncertainty volume")):
        if node is None or node.GetScene() is None:
            return False, f"The result's {what} is no longer in the scene."
    path, why = refineModel(result)
    if path is None:
        return False, why
    name = result.segmentationNode.GetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Model") or ""
    return refineAvailability(path, name)


# -- node updates ---------------------------------------------------------------------------------------


def segmentMask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """The segment as a ``[K, J, I]`` uint8 0/1 array on ``volumeNode``'s grid (no node is added to the scene).

    A labelmap already on the volume's grid (as MedDiffSeg writes them) is copied in place by its extent;
    another one is resampled onto the grid (nearest neighbour)."""
    slicer = _slicer()
    shape = tuple(reversed(dimensions(volumeNode)))
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise KeyError(segmentId)
    image = slicer.vtkOrientedImageData()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    out = np.zeros(shape, np.uint8)
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, image, False):
        return out
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4] or image.GetPointData().GetScalars() is None:
        return out
    from vtk.util import numpy_support

    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    onGrid = np.allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], ijkToRasArray(volumeNode),
                         atol=1e-6)
    if onGrid:
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        source = tuple(slice(max(0, -lo), min(hi - lo + 1, n - lo)) for lo, hi, n in
                       zip(extent[4::-2], extent[5::-2], shape))
        target = tuple(slice(max(0, lo), min(hi + 1, n)) for lo, hi, n in zip(extent[4::-2], extent[5::-2], shape))
        out[target] = values[source] == segment.GetLabelValue()
        return out
    reference = nodesLib._orientedLabelmap(out, volumeNode)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled):
        raise RuntimeError(f"could not read segment {segmentId!r} on the volume's grid")
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape)
    return (values == segment.GetLabelValue()).astype(np.uint8)


def _slab(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    return tuple(index)


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (``[K, J, I]`` slices) holding every voxel of ``mask``; one voxel when it is empty."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 1))
    return tuple(box)


def replaceSegmentSlab(segmentationNode, segmentId: str, volumeNode, axis: int, start: int, stop: int,
                       mask: np.ndarray) -> np.ndarray:
    """Set segment ``segmentId`` to ``mask`` on slices ``start..stop-1`` along numpy ``axis``, keeping the rest of
    it; no other segment is written. Returns the segment's whole new mask."""
    import vtk
    from vtk.util import numpy_support

    slicer = _slicer()
    full = segmentMask(segmentationNode, segmentId, volumeNode)
    full[_slab(axis, start, stop)] = mask
    # only the box around the new mask is written: MODE_REPLACE sets the whole segment to it
    box = _box(full)
    part = np.ascontiguousarray(full[box])
    image = slicer.vtkOrientedImageData()
    (k0, k1), (j0, j1), (i0, i1) = ((b.start, b.stop - 1) for b in box)
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(part.shape)[:] = part
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
        raise RuntimeError(f"could not write segment {segmentId!r}")
    return full


def replaceVolumeSlab(volumeNode, axis: int, start: int, stop: int, values: np.ndarray) -> None:
    """Write ``values`` into slices ``start..stop-1`` along numpy ``axis`` of a scalar volume node."""
    slicer = _slicer()
    array = slicer.util.arrayFromVolume(volumeNode)
    array[_slab(axis, start, stop)] = values
    slicer.util.arrayFromVolumeModified(volumeNode)


def labelMap(segmentationNode, volumeNode, segmentIds: Sequence[str | None]) -> np.ndarray:
    """The segments as one label map on the volume's grid: label ``i`` = ``segmentIds[i-1]`` (None: absent);
    where segments overlap, the later one wins."""
    labels = np.zeros(tuple(reversed(dimensions(volumeNode))), np.uint8)
    for label, segmentId in enumerate(segmentIds, start=1):
        if segmentId is not None and segmentationNode.GetSegmentation().GetSegment(segmentId) is not None:
            labels[segmentMask(segmentationNode, segmentId, volumeNode) > 0] = label
    return labels


# -- Markups ------------------------------------------------------------------------------------------------


def interactionNodes(scene):
    """(selection node, interaction node) of the application (the scene's singletons in scripts and tests)."""
    slicer = _slicer()
    app = getattr(slicer, "app", None)
    logic = app.applicationLogic() if app is not None and hasattr(app, "applicationLogic") else None
    selection = logic.GetSelectionNode() if logic is not None else None
    interaction = logic.GetInteractionNode() if logic is not None else None
    selection = selection or scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    interaction = interaction or scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    return selection, interaction


def startPlaceMode(node, persistent: bool) -> bool:
    """Put the views in place mode for the Markups ``node`` (as the Markups toolbar does); False without views."""
    selection, interaction = interactionNodes(node.GetScene())
    if selection is None or interaction is None:
        return False
    selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selection.SetActivePlaceNodeID(node.GetID())
    interaction.SetPlaceModePersistence(1 if persistent else 0)
    interaction.SetCurrentInteractionMode(interaction.Place)
    return True


def stopPlaceMode(scene) -> None:
    _selection, interaction = interactionNodes(scene)
    if interaction is not None and interaction.GetCurrentInteractionMode() == interaction.Place:
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)


@dataclass
class Mark:
    """What one correction placed: a point (world RAS) or a box (world RAS centre and size), to take off the
    views on undo and put back on redo."""

    organ: str
    kind: str  # "positive" | "negative" | "box"
    ras: tuple[float, float, float]
    size: tuple[float, float, float] | None = None
    nodeId: str = ""
    pointId: str = ""


class RefineController:
    """Refine mode for one result; see the module docstring.

    ``notify(text)`` receives the messages for the user. The Widget calls :meth:`poll` from a timer and
    then reads :attr:`state`, :attr:`busy`, :attr:`canUndo`, :attr:`canRedo`, :meth:`progressText`.
    """

    def __init__(self, result, *, device: str = "auto", samples: int | None = None, seed: int | None = None,
                 worker: RefineWorker | None = None, workerOptions: dict | None = None,
                 schedule: Callable[[Callable[[], None]], None] | None = None,
                 notify: Callable[[str], None] | None = None, suggestions: int = SUGGESTIONS):
        self.result = result
        self.volumeNode = result.volumeNode
        self.segmentationNode = result.segmentationNode
        self.uncertaintyNode = result.uncertaintyNode
        self.scene = self.volumeNode.GetScene()
        organs = sorted(result.organs, key=lambda o: int(o.get("label", 0)))
        self.organs: list[str] = [o["name"] for o in organs]
        self.displayNames = {o["name"]: o.get("display_name") or o["name"] for o in organs}
        self.colors = {o["name"]: tuple(float(c) / 255.0 for c in o.get("color", (128, 174, 128))) for o in organs}
        self.device = device
        self.samples = samples if samples is not None else result.samples
        self.seed = int(seed if seed is not None else (result.summary.get("settings") or {}).get("seed", 0) or 0)
        self.suggestionCount = int(suggestions)
        self.worker = worker or RefineWorker(**(workerOptions or {}))
        self.schedule = schedule or (lambda f: f())
        self.notify = notify or (lambda text: None)
        self.currentOrgan = self.organs[0] if self.organs else ""
        self.locked: set[str] = {o for o in (result.summary.get("locked") or []) if o in self.organs}
        self.suggestions: list[dict[str, Any]] = []
        self.suggestionsOrgan = ""
        self.lastMessage = ""
        self.externalEdit = False
        self._pointNodes: dict[tuple[str, bool], Any] = {}
        self._boxNodes: list = []
        self._suggestionsNode = None
        self._observed: list[tuple[Any, int]] = []
        self._handled: set[tuple[str, str]] = set()  # (node ID, control point ID) already sent or refused
        self._sent: dict[int, Mark] = {}  # correction id -> its mark
        self._undoMarks: list[Mark] = []
        self._redoMarks: list[Mark] = []
        self._scanQueued = False
        self._muted = False  # our own changes to markups and segments
        self._stopper: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check that the result can be refined, send its current state to a new worker. Raises ``ValueError``
        (for the user) when it cannot; nothing is left behind then."""
        possible, why = resultRefineAvailability(self.result)
        if not possible:
            raise ValueError(why)
        modelPath, _why = refineModel(self.result)
        segmentIds = [self.result.segmentIds.get(o) for o in self.organs]
        labels = labelMap(self.segmentationNode, self.volumeNode, segmentIds)
        image = volumeArray(self.volumeNode)
        if image.ndim != 3:
            raise ValueError(f"volume {self.volumeNode.GetName()!r} is not a scalar volume")
        uncertainty = _slicer().util.arrayFromVolume(self.uncertaintyNode)
        self.worker.start(image, labels, uncertainty, lpsGeometry(self.volumeNode), self.organs, str(modelPath),
                          device=self.device, samples=self.samples, seed=self.seed, locked=sorted(self.locked),
                          interactions=list(self.result.summary.get("interactions") or []),
                          suggestions=self.suggestionCount)
        # painting in Segment Editor changes a segment's source representation (binary labelmap)
        self._observe(self.segmentationNode.GetSegmentation(), _slicer().vtkSegmentation.SourceRepresentationModified,
                      self._onSegmentModified)

    @property
    def state(self) -> str:
        return self.worker.state

    @property
    def busy(self) -> bool:
        return self.worker.busy

    @property
    def canUndo(self) -> bool:
        return self.worker.canUndo and self.worker.alive

    @property
    def canRedo(self) -> bool:
        return self.worker.canRedo and self.worker.alive

    def progressText(self) -> str:
        if self.state == "starting":
            message = self.worker.progress.get("message") or "starting"
            return f"Preparing: {message}"
        if self.busy:
            return "Correcting..."
        if self.worker.progress.get("stage") == "encode" and self.worker.progress.get("fraction", 1.0) < 1.0:
            return f"Ready (encoding ahead: {self.worker.progress.get('message', '')})"
        return "Ready" if self.state == "ready" else self.state.capitalize()

    def stop(self, wait: bool = True) -> None:
        """Leave Refine mode: stop the worker, take the tools' Markups nodes out of the scene. The segmentation
        and the uncertainty keep every correction. ``wait=False`` returns at once (the worker is stopped by a
        background thread; :meth:`waitStopped`)."""
        for subject, tag in self._observed:
            try:
                subject.RemoveObserver(tag)
            except Exception:  # pragma: no cover - a node already deleted
                pass
        self._observed = []
        if self.scene is not None:
            stopPlaceMode(self.scene)
            for node in self.toolNodes():
                self.scene.RemoveNode(node)
        self._pointNodes, self._boxNodes, self._suggestionsNode = {}, [], None
        if wait:
            self.worker.shutdown(wait=True)
        else:
            self._stopper = threading.Thread(target=self.worker.shutdown, kwargs={"wait": True},
                                             name="MedDiffSeg-refine-stop", daemon=True)
            self._stopper.start()

    def waitStopped(self, timeout: float | None = None) -> bool:
        if self._stopper is not None:
            self._stopper.join(timeout)
            return not self._stopper.is_alive()
        return True

    def toolNodes(self) -> list:
        """The Markups nodes of Refine mode in the scene (points, boxes, suggestions)."""
        if self.scene is None:
            return []
        found = []
        mine = self.segmentationNode.GetID()
        for className in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"):
            collection = self.scene.GetNodesByClass(className)
            for i in range(collection.GetNumberOfItems()):
                node = collection.GetItemAsObject(i)
                if node.GetAttribute(TOOL_ATTRIBUTE) and node.GetAttribute(TOOL_ATTRIBUTE + "Result") == mine:
                    found.append(node)
        return found

    # -- polling ---------------------------------------------------------------------------------------------
    def poll(self) -> list[dict[str, Any]]:
        """Read the worker's events and apply them to the scene; returns them."""
        events = self.worker.poll()
        for event in events:
            try:
                self._handle(event)
            except Exception as exc:
                log.exception("MedDiffSeg: applying a refine update failed")
                self._say(f"Applying the correction failed: {exc}")
        return events

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "ready":
            self._say(f"Ready: place points or a box on {self.displayNames.get(self.currentOrgan, '')}.")
            self.requestSuggestions()
        elif kind == "suggestions":
            self._showSuggestions(event.get("organ", ""), event.get("suggestions") or [])
        elif kind == "error":
            self._say(f"Refine stopped: {event['message']}")
        elif kind == "reply":
            getattr(self, "_reply_" + str(event.get("cmd")), self._reply_other)(event)

    def _reply_refine(self, event: dict[str, Any]) -> None:
        mark = self._sent.pop(event.get("id"), None)
        if not event["ok"]:
            self._removeMark(mark)
            self._say(("Cancelled: " if event.get("kind") == "Cancelled" else "Not applied: ") + event["message"])
            return
        self._applyUpdate(event["update"], event.get("interaction"))
        if mark is not None:
            self._undoMarks.append(mark)
        self._redoMarks.clear()
        inter = event.get("interaction") or {}
        self._say(f"{self.displayNames.get(inter.get('organ'), inter.get('organ'))}: "
                  f"{int(inter.get('changed_voxels', 0))} voxels changed on {len(inter.get('slices') or [])} slices "
                  f"in {float(inter.get('seconds', 0.0)):.1f} s.")

    def _reply_undo(self, event: dict[str, Any]) -> None:
        mark = self._replayed(event, "Undo", "Undone: the last correction of {organ}.", undone=True)
        if mark is not None:
            self._removeMark(mark)
            self._redoMarks.append(mark)

    def _reply_redo(self, event: dict[str, Any]) -> None:
        mark = self._replayed(event, "Redo", "Redone: the correction of {organ}.", undone=False)
        if mark is not None:
            self._restoreMark(mark)
            self._undoMarks.append(mark)

    def _replayed(self, event: dict[str, Any], what: str, done: str, undone: bool) -> Mark | None:
        """Apply an undo or redo reply; returns the mark of the correction it concerns (None: none)."""
        if not event["ok"]:
            self._say(f"{what}: {event['message']}")
            return None
        if event.get("update") is None:
            self._say(f"Nothing to {what.lower()}.")
            return None
        self._applyUpdate(event["update"], event.get("interaction"), undone=undone)
        self._say(done.format(organ=self.displayNames.get(event["update"]["organ"], "")))
        source = self._undoMarks if undone else self._redoMarks
        return source.pop() if source else None

    def _reply_suggest(self, event: dict[str, Any]) -> None:
        if event["ok"]:
            self._showSuggestions(event.get("organ", ""), event.get("suggestions") or [])

    def _reply_lock(self, event: dict[str, Any]) -> None:
        if not event["ok"]:
            self._say(f"Lock: {event['message']}")

    def _reply_other(self, event: dict[str, Any]) -> None:
        if not event["ok"]:
            self._say(event["message"])

    def _say(self, text: str) -> None:
        self.lastMessage = text
        self.notify(text)

    # -- corrections ------------------------------------------------------------------------------------------
    def setCurrentOrgan(self, organ: str) -> None:
        if organ in self.organs and organ != self.currentOrgan:
            self.currentOrgan = organ
            self.requestSuggestions()

    def setLocked(self, organ: str, locked: bool) -> None:
        if organ not in self.organs or (organ in self.locked) == bool(locked):
            return
        (self.locked.add if locked else self.locked.discard)(organ)
        if self.worker.alive:
            self.worker.lock(organ, bool(locked))
        self._updateSummary(lambda s: s.__setitem__("locked", sorted(self.locked)))

    def requestSuggestions(self, organ: str | None = None) -> None:
        organ = organ or self.currentOrgan
        if self.worker.alive and organ and self.suggestionCount > 0 and self.result.hasUncertainty:
            self.worker.suggest(organ, self.suggestionCount)

    def undo(self) -> None:
        if self.worker.alive:
            self.worker.undo()

    def redo(self) -> None:
        if self.worker.alive:
            self.worker.redo()

    def cancel(self) -> None:
        """Cancel the corrections sent and not answered yet (each leaves the result as it was)."""
        if self.worker.alive:
            self.worker.cancel()

    def pointsNode(self, organ: str, positive: bool):
        """The Markups point list of ``organ``'s positive (or negative) clicks, made when first needed."""
        key = (organ, bool(positive))
        node = self._pointNodes.get(key)
        if node is None or node.GetScene() is None:
            sign = "+" if positive else "-"
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                self.scene.GenerateUniqueName(f"{self.displayNames[organ]} {sign}"))
            self._tag(node, "positive" if positive else "negative", organ)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            color = self.colors[organ] if positive else NEGATIVE_COLOR
            display.SetSelectedColor(*color)
            display.SetColor(*color)
            node.SetMarkupLabelFormat(f"{sign}")
            self._observe(node, _slicer().vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPlaced)
            self._pointNodes[key] = node
        return node

    def placePoints(self, organ: str, positive: bool) -> bool:
        """Place mode for ``organ``'s positive or negative clicks (persistent: one click, one correction)."""
        return startPlaceMode(self.pointsNode(organ, positive), persistent=True)

    def placeBox(self, organ: str) -> bool:
        """Place mode for a new box of ``organ`` (a box replaces the organ's earlier one)."""
        for node in list(self._boxNodes):  # a box whose placement was abandoned
            if node.GetScene() is not None and node.GetNumberOfControlPoints() == 0:
                self.scene.RemoveNode(node)
                self._boxNodes.remove(node)
        node = self._newBoxNode(organ)
        return startPlaceMode(node, persistent=False)

    def _newBoxNode(self, organ: str):
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode",
                                            self.scene.GenerateUniqueName(f"{self.displayNames[organ]} box"))
        self._tag(node, "box", organ)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*BOX_COLOR)
        self._observe(node, _slicer().vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPlaced)
        self._boxNodes.append(node)
        return node

    def placingTool(self) -> tuple[str, str] | None:
        """``(organ, "positive" | "negative" | "box")`` of the tool the views are placing with, or None."""
        selection, interaction = interactionNodes(self.scene)
        if selection is None or interaction is None or interaction.GetCurrentInteractionMode() != interaction.Place:
            return None
        node = self.scene.GetNodeByID(selection.GetActivePlaceNodeID() or "")
        if node is None or node.GetAttribute(TOOL_ATTRIBUTE + "Result") != self.segmentationNode.GetID():
            return None
        return node.GetAttribute(TOOL_ATTRIBUTE + "Organ"), node.GetAttribute(TOOL_ATTRIBUTE)

    def _tag(self, node, kind: str, organ: str) -> None:
        node.SetAttribute(TOOL_ATTRIBUTE, kind)
        node.SetAttribute(TOOL_ATTRIBUTE + "Organ", organ)
        node.SetAttribute(TOOL_ATTRIBUTE + "Result", self.segmentationNode.GetID())

    def _observe(self, subject, event, callback) -> None:
        self._observed.append((subject, subject.AddObserver(event, callback)))

    def _onPlaced(self, caller=None, event=None) -> None:
        if self._muted or self._scanQueued:
            return
        self._scanQueued = True
        self.schedule(self.processPlaced)

    def _onSegmentModified(self, caller=None, event=None) -> None:
        if not self._muted and not self.externalEdit:
            self.externalEdit = True
            self._say("The segmentation was edited outside Refine mode. The next correction of an organ rewrites it on "
                      "the slices it reaches; stop and start Refine again to refine from the edited segments.")

    def processPlaced(self) -> None:
        """Send one correction per point or box placed since the last call (see the module docstring)."""
        self._scanQueued = False
        for (organ, positive), node in list(self._pointNodes.items()):
            if node.GetScene() is None:
                continue
            for i in range(node.GetNumberOfControlPoints()):
                pointId = node.GetNthControlPointID(i)
                if ((node.GetID(), pointId) in self._handled
                        or node.GetNthControlPointPositionStatus(i) != node.PositionDefined):
                    continue
                self._handled.add((node.GetID(), pointId))
                ras = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(i, ras)
                self._sendPoint(node, pointId, organ, positive, tuple(ras))
        for node in list(self._boxNodes):
            if node.GetScene() is None or (node.GetID(), "box") in self._handled or not node.GetControlPointPlacementComplete():
                continue
            self._handled.add((node.GetID(), "box"))
            self._sendBox(node)

    def _refused(self, organ: str) -> str:
        if organ in self.locked:
            return f"{self.displayNames[organ]} is locked: unlock it to correct it."
        if not self.worker.alive:
            return f"Refine is not running ({self.worker.errorMessage or self.state})."
        return ""

    def _sendPoint(self, node, pointId: str, organ: str, positive: bool, rasWorld: tuple[float, float, float]) -> None:
        local = worldToVolumeRas(self.volumeNode, rasWorld)
        why = self._refused(organ)
        if not why and not insideVolume(self.volumeNode, local):
            why = (f"The point ({rasWorld[0]:.1f}, {rasWorld[1]:.1f}, {rasWorld[2]:.1f}) mm RAS is outside the volume "
                   f"{self.volumeNode.GetName()}: ignored. Place points on the volume in a slice view.")
        mark = Mark(organ, "positive" if positive else "negative", rasWorld, None, node.GetID(), pointId)
        if why:
            self._removeMark(mark)
            self._say(why)
            return
        lps = rasToLps(local)
        self._muted = True
        try:
            node.SetNthControlPointLocked(node.GetNthControlPointIndexByID(pointId), True)
        finally:
            self._muted = False
        self._send(mark, lambda: self.worker.refine(organ, positive=[lps] if positive else [],
                                                    negative=[] if positive else [lps]))

    def _send(self, mark: Mark, send: Callable[[], int]) -> None:
        try:
            self._sent[send()] = mark
        except RuntimeError as exc:  # the worker ended since the last poll (the next poll says why)
            self._removeMark(mark)
            self._say(f"Not sent: {exc}")

    def _sendBox(self, node) -> None:
        organ = node.GetAttribute(TOOL_ATTRIBUTE + "Organ")
        centre, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        node.GetCenterWorld(centre)
        node.GetSizeWorld(size)
        mark = Mark(organ, "box", tuple(centre), tuple(size), node.GetID(), "box")
        why = self._refused(organ)
        box = None if why else self.boxOnVolume(node)
        if not why and box is None:
            why = f"The box does not overlap the volume {self.volumeNode.GetName()}: ignored."
        if why:
            self._removeMark(mark)
            self._say(why)
            return
        self._muted = True
        try:
            node.SetLocked(True)
            for other in self._boxNodes:  # the organ's earlier box no longer counts: show only the latest
                if other is not node and other.GetAttribute(TOOL_ATTRIBUTE + "Organ") == organ and other.GetDisplayNode():
                    other.GetDisplayNode().SetVisibility(False)
        finally:
            self._muted = False
        self._send(mark, lambda: self.worker.refine(organ, box=box))

    def boxOnVolume(self, roiNode) -> list[float] | None:
        """The ROI as the library's box: two opposite corners (LPS mm, the volume's coordinates) of the voxel box
        that covers the ROI, clipped to the volume; None when the ROI misses the volume."""
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)  # world
        corners = [(x, y, z) for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
        ijk = np.array([rasToIjk(self.volumeNode, worldToVolumeRas(self.volumeNode, c)) for c in corners])
        lo, hi = ijk.min(axis=0), ijk.max(axis=0)
        dims = np.array(dimensions(self.volumeNode), dtype=float)
        if np.any(hi < -0.5) or np.any(lo > dims - 0.5) or not np.all(np.isfinite(ijk)):
            return None
        lo, hi = np.clip(lo, 0.0, dims - 1), np.clip(hi, 0.0, dims - 1)
        matrix = ijkToRasArray(self.volumeNode)
        a = rasToLps((matrix @ np.array([*lo, 1.0]))[:3])
        b = rasToLps((matrix @ np.array([*hi, 1.0]))[:3])
        return [*a, *b]

    def _removeMark(self, mark: Mark | None) -> None:
        if mark is None:
            return
        node = self.scene.GetNodeByID(mark.nodeId) if mark.nodeId else None
        if node is None:
            return
        self._muted = True
        try:
            if mark.kind == "box":
                self.scene.RemoveNode(node)
                if node in self._boxNodes:
                    self._boxNodes.remove(node)
            else:
                index = node.GetNthControlPointIndexByID(mark.pointId)
                if index >= 0:
                    node.RemoveNthControlPoint(index)
            self._handled.discard((mark.nodeId, mark.pointId))  # Markups reuse the ID of a removed point
        finally:
            self._muted = False

    def _restoreMark(self, mark: Mark) -> None:
        self._muted = True
        try:
            if mark.kind == "box":
                node = self._newBoxNode(mark.organ)
                node.SetCenterWorld(*mark.ras)
                node.SetSizeWorld(*(mark.size or (0.0, 0.0, 0.0)))
                node.SetLocked(True)
                mark.nodeId = node.GetID()
                self._handled.add((node.GetID(), "box"))
            else:
                node = self.pointsNode(mark.organ, mark.kind == "positive")
                index = node.AddControlPointWorld(*mark.ras)
                node.SetNthControlPointLocked(index, True)
                mark.nodeId, mark.pointId = node.GetID(), node.GetNthControlPointID(index)
                self._handled.add((mark.nodeId, mark.pointId))
        finally:
            self._muted = False

    # -- applying updates --------------------------------------------------------------------------------------
    def _applyUpdate(self, update: dict[str, Any], interaction: dict | None, undone: bool = False) -> None:
        organ, axis, start, stop, mask, uncertainty = self.worker.readUpdate(update)
        segmentId = self.result.segmentIds.get(organ)
        if segmentId is None or self.segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise RuntimeError(f"the segment of {self.displayNames.get(organ, organ)} is no longer in "
                               f"{self.segmentationNode.GetName()}")
        self._muted = True
        try:
            full = replaceSegmentSlab(self.segmentationNode, segmentId, self.volumeNode, axis, start, stop, mask)
        finally:
            self._muted = False
        replaceVolumeSlab(self.uncertaintyNode, axis, start, stop, uncertainty)
        self._recount(organ, full, interaction, undone)

    def _recount(self, organ: str, mask: np.ndarray, interaction: dict | None, undone: bool) -> None:
        """The organ's volume and mean uncertainty in the result, and the record of the corrections."""
        voxelMl = float(np.prod(self.volumeNode.GetSpacing())) / 1000.0
        count = int(mask.sum())
        unc = _slicer().util.arrayFromVolume(self.uncertaintyNode)
        mean = float(unc[mask > 0].mean(dtype=np.float64)) if count else None

        def change(summary: dict) -> None:
            # what only the automatic run knew (where the organ probably continues, its most uncertain slice)
            # no longer holds for a corrected organ, as in the CLI's refined summary
            for entry in summary.get("organs", []):
                if entry.get("name") == organ:
                    entry.update(voxel_count=count, volume_ml=count * voxelMl, mean_uncertainty=mean,
                                 possible_continuation=[], max_uncertainty_slice=None,
                                 max_uncertainty_position_mm=None)
            record = list(summary.get("interactions") or [])
            if interaction is not None:
                if undone:
                    if record and record[-1] == interaction:
                        record.pop()
                else:
                    record.append(interaction)
            summary["interactions"] = record

        self._updateSummary(change)
        for entry in self.result.organs:  # often the summary's own entries; updating twice changes nothing
            if entry.get("name") == organ:
                entry.update(voxel_count=count, volume_ml=count * voxelMl, mean_uncertainty=mean,
                             possible_continuation=[], max_uncertainty_slice=None, max_uncertainty_position_mm=None)

    def _updateSummary(self, change: Callable[[dict], None]) -> None:
        change(self.result.summary)
        self.segmentationNode.SetAttribute(nodesLib.ATTRIBUTE_PREFIX + "Summary",
                                           json.dumps(self.result.summary, default=str))

    # -- suggestions ----------------------------------------------------------------------------------------------
    def suggestionsNode(self):
        node = self._suggestionsNode
        if node is None or node.GetScene() is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                self.scene.GenerateUniqueName("MedDiffSeg suggestions"))
            self._tag(node, "suggestions", "")
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*SUGGESTION_COLOR)
            node.GetDisplayNode().SetColor(*SUGGESTION_COLOR)
            node.SetLocked(True)
            self._suggestionsNode = node
        return node

    def _showSuggestions(self, organ: str, suggestions: list[dict[str, Any]]) -> None:
        """Replace the suggestion points: one per suggestion, labelled ``Liver + 34%`` (organ, the click to make,
        the chance the click lands on a wrong voxel)."""
        self.suggestions, self.suggestionsOrgan = list(suggestions), organ
        node = self.suggestionsNode()
        self._muted = True
        try:
            node.RemoveAllControlPoints()
            for s in suggestions:
                try:
                    ras = volumeRasToWorld(self.volumeNode, lpsToRas(s["point_mm"]))
                    confidence = float(s["confidence"])
                except (KeyError, TypeError, ValueError):
                    continue
                if not math.isfinite(confidence):
                    continue
                index = node.AddControlPointWorld(*ras)
                node.SetNthControlPointLabel(index, self.suggestionLabel(organ, s))
                node.SetNthControlPointDescription(
                    index, f"look here: {'probably organ the result misses' if s.get('positive') else 'probably not organ'}"
                           f" (click positive where it is organ, negative where it is not); expected wrong volume "
                           f"within reach {float(s.get('expected_wrong_ml', 0.0)):.2f} mL")
                node.SetNthControlPointLocked(index, True)
        finally:
            self._muted = False

    def suggestionLabel(self, organ: str, suggestion: dict[str, Any]) -> str:
        sign = "+" if suggestion.get("positive") else "-"
        return f"{self.displayNames.get(organ, organ)} {sign} {float(suggestion['confidence']):.0%}"

    def suggestionRas(self, index: int = 0) -> tuple[float, float, float] | None:
        """World RAS of suggestion ``index`` (None when there is none)."""
        if not 0 <= index < len(self.suggestions):
            return None
        return volumeRasToWorld(self.volumeNode, lpsToRas(self.suggestions[index]["point_mm"]))
