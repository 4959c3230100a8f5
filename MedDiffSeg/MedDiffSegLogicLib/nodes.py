"""Building and showing MRML nodes for a segmentation result (no Qt).

- :func:`fillSegmentation` writes one segment per organ into a segmentation node: ID = the
  organ's name, name = its display name, its colour, and a terminology entry with the model card's
  SNOMED CT category/type codes; the labelmaps are on exactly the input volume's voxel grid.
- :func:`createUncertaintyNode` makes a scalar volume with the input's IJK→RAS and a colour map.
- :class:`SceneTransaction` removes every node a failed or cancelled step added, so the scene is
  left as it was.
- :func:`readVolumeFile` / :func:`writeVolumeNode` go through storage nodes that are *not* added to
  the scene (the scene's node count does not change).
- :func:`showOverlay` and :func:`jumpSlices` act on slice composite/slice nodes in the scene.
- The uncertainty overlay (:func:`setUncertaintyDisplay`, :func:`showUncertaintyOverlay`): a colour
  map over 0..the map's maximum, *transparent below a threshold* (the display node's threshold:
  where the samples agree the image shows through, instead of a dark layer over everything), a
  colour legend titled with the values' units (:data:`UNCERTAINTY_UNITS`), and optionally shown only
  inside the segments and a margin around them (a derived volume, :func:`segmentsOverlayNode`,
  referenced from the uncertainty node). All of it lives in MRML nodes, display nodes and node
  references, so it is saved with the scene and comes back when the scene is loaded.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from .geometry import copyGeometry, dimensions, ijkToRasArray, sameGrid

log = logging.getLogger(__name__)

#: Colour maps offered for the uncertainty overlay: display name -> colour node IDs, first present wins
#: (Slicer's file-based tables are not in every build; the procedural ones always are).
COLOR_MAPS: dict[str, tuple[str, ...]] = {
    "Inferno": ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron"),
    "Viridis": ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow"),
    "Hot": ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron"),
    "Iron": ("vtkMRMLColorTableNodeIron",),
    "Rainbow": ("vtkMRMLColorTableNodeRainbow",),
    "Grey": ("vtkMRMLColorTableNodeGrey",),
}
DEFAULT_COLOR_MAP = "Inferno"

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

#: Node attributes recording how a result was made (read back by the Widget and by DICOM export).
ATTRIBUTE_PREFIX = "MedDiffSeg."

#: What the uncertainty map holds (the legend's title, the panel's tooltips): per voxel, the variance of
#: the diffusion samples' foreground probability of the organ assigned there (0: the samples agree;
#: 0.25: they split evenly between organ and background).
UNCERTAINTY_TITLE = "Uncertainty"
UNCERTAINTY_UNITS = "variance of the samples' foreground probability (0 = agree, 0.25 = split evenly)"
#: The legend's second title line: short, as a slice view's legend has little room (the panel gives the rest).
LEGEND_UNITS = "variance of samples"
UNCERTAINTY_MAX = 0.25
#: Below this the overlay is transparent (a standard deviation of 0.1 between the samples' probabilities).
DEFAULT_THRESHOLD = 0.01
#: Margin (voxels) around the segments when the overlay is shown only near them: a boundary the model
#: missed is uncertain just outside the segment.
SEGMENTS_MARGIN_VOXELS = 3
#: Node references (saved with the scene).
UNCERTAINTY_REFERENCE = "MedDiffSegUncertainty"      # segmentation -> uncertainty volume
INPUT_REFERENCE = "MedDiffSegInput"                  # segmentation -> input volume
SEGMENTS_OVERLAY_REFERENCE = "MedDiffSegOverlayNearSegments"  # uncertainty -> its masked copy


def _slicer():
    import slicer

    return slicer


# -- scene bookkeeping ------------------------------------------------------------------------------


def nodeIDs(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


class SceneTransaction:
    """Context manager: on an exception, remove every node added to ``scene`` inside the block.

    Also restores the segments of an existing segmentation node registered with
    :meth:`protectSegmentation` (the node the user chose as output), so a failure halfway through
    filling it does not leave a mix of old and new segments.
    """

    def __init__(self, scene):
        self.scene = scene
        self._before: set[str] = set()
        self._protected: list[tuple[object, object]] = []

    def __enter__(self) -> "SceneTransaction":
        self._before = set(nodeIDs(self.scene))
        return self

    def protectSegmentation(self, segmentationNode) -> None:
        slicer = _slicer()
        backup = slicer.vtkSegmentation()
        backup.DeepCopy(segmentationNode.GetSegmentation())
        self._protected.append((segmentationNode, backup))

    def addedNodes(self) -> list:
        return [n for n in (self.scene.GetNodeByID(i) for i in nodeIDs(self.scene) if i not in self._before) if n]

    def rollback(self) -> None:
        for node in reversed(self.addedNodes()):
            try:
                self.scene.RemoveNode(node)
            except Exception:  # pragma: no cover - keep removing the others
                log.exception("could not remove node %s", node.GetID())
        for segmentationNode, backup in self._protected:
            segmentationNode.GetSegmentation().DeepCopy(backup)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False


# -- terminology ---------------------------------------------------------------------------------------


def _code(d: dict | None) -> tuple[str, str, str]:
    d = d or {}
    return (str(d.get("scheme", "")), str(d.get("code", "")), str(d.get("meaning", "")))


def terminologyEntry(category: dict, type_: dict) -> str:
    """Slicer's serialised terminology entry for a category/type pair of codes (e.g. SNOMED CT)."""
    (cs, cc, cm), (ts, tc, tm) = _code(category), _code(type_)
    slicer = _slicer()
    entryClass = getattr(slicer, "vtkSlicerTerminologyEntry", None)
    logicClass = getattr(slicer, "vtkSlicerTerminologiesModuleLogic", None)
    if entryClass is not None and logicClass is not None:
        entry = entryClass()
        entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
        setRegionContext = getattr(entry, "SetRegionContextName", None) or entry.SetAnatomicContextName
        setRegionContext(ANATOMIC_CONTEXT)
        for obj, (scheme, value, meaning) in ((entry.GetCategoryObject(), (cs, cc, cm)), (entry.GetTypeObject(), (ts, tc, tm))):
            obj.SetCodingSchemeDesignator(scheme)
            obj.SetCodeValue(value)
            obj.SetCodeMeaning(meaning)
        return logicClass.SerializeTerminologyEntry(entry)
    # The same format, written out (older builds without the terminology classes).
    return f"{TERMINOLOGY_CONTEXT}~{cs}^{cc}^{cm}~{ts}^{tc}^{tm}~^^~{ANATOMIC_CONTEXT}~^^~^^"


# -- segmentation --------------------------------------------------------------------------------------


def createSegmentationNode(scene, volumeNode, name: str):
    """A new segmentation node whose reference geometry is ``volumeNode``'s grid."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    if volumeNode.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    return node


def _orientedLabelmap(mask_kji: np.ndarray, volumeNode):
    """A vtkOrientedImageData holding ``mask_kji`` (uint8) on the volume's exact IJK→RAS grid."""
    import vtk
    from vtk.util import numpy_support

    slicer = _slicer()
    k, j, i = mask_kji.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)[:] = mask_kji
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def fillSegmentation(segmentationNode, volumeNode, labels_kji: np.ndarray, organs: Sequence) -> dict[str, str]:
    """Write label ``i`` of ``labels_kji`` (``[K, J, I]``, the volume's grid) as the segment of ``organs[i-1]``.

    ``organs`` are registry Organ objects (or dicts with ``name``, ``display_name``, ``color``,
    ``category``, ``type``). Segments already in the node with the same IDs are replaced; other
    segments are kept. Returns ``{organ name: segment ID}``.
    """
    slicer = _slicer()
    labels_kji = np.asarray(labels_kji)
    volumeShape = tuple(reversed(dimensions(volumeNode)))
    if labels_kji.shape != volumeShape:
        raise ValueError(f"label map of shape {labels_kji.shape} does not match the volume's {volumeShape}")
    segmentation = segmentationNode.GetSegmentation()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids: dict[str, str] = {}
    for label, organ in enumerate(organs, start=1):
        o = organ if isinstance(organ, dict) else organ.to_dict()
        segmentId = str(o["name"])
        if segmentation.GetSegment(segmentId) is not None:
            segmentation.RemoveSegment(segmentId)
        color = [float(c) / 255.0 for c in o.get("color", (128, 174, 128))]
        added = segmentation.AddEmptySegment(segmentId, str(o.get("display_name", o["name"])), color)
        if added != segmentId:  # pragma: no cover - AddEmptySegment honours a free ID
            raise RuntimeError(f"could not add segment {segmentId!r}")
        segment = segmentation.GetSegment(segmentId)
        segment.SetTerminology(terminologyEntry(o.get("category", {}), o.get("type", {})))
        mask = labels_kji == label
        if mask.any():
            if not logic.SetBinaryLabelmapToSegment(_orientedLabelmap(mask.view(np.uint8), volumeNode), segmentationNode,
                                                    segmentId, logic.MODE_REPLACE):
                raise RuntimeError(f"could not write the labelmap of segment {segmentId!r}")
        ids[o["name"]] = segmentId
    segmentation.CollapseBinaryLabelmaps(False)  # share layers where segments do not overlap
    return ids


# -- uncertainty volume ---------------------------------------------------------------------------------


def colorNodeID(scene, colorMap: str) -> str | None:
    """ID of the first colour node of ``colorMap`` present in ``scene`` (None when none is)."""
    for nodeID in COLOR_MAPS.get(colorMap, ()) + COLOR_MAPS[DEFAULT_COLOR_MAP]:
        if scene.GetNodeByID(nodeID) is not None:
            return nodeID
    return None


def setUncertaintyDisplay(uncertaintyNode, colorMap: str = DEFAULT_COLOR_MAP, threshold: float | None = None,
                          top: float | None = None) -> None:
    """Colour map over 0..``top`` (default: the map's maximum), no interpolation, and values below
    ``threshold`` (default: the node's last one, else :data:`DEFAULT_THRESHOLD`) transparent."""
    slicer = _slicer()
    scene = uncertaintyNode.GetScene()
    display = uncertaintyNode.GetDisplayNode()
    if display is None:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        uncertaintyNode.SetAndObserveDisplayNodeID(display.GetID())
    nodeID = colorNodeID(scene, colorMap)
    if nodeID:
        display.SetAndObserveColorNodeID(nodeID)
    if top is None:
        array = slicer.util.arrayFromVolume(uncertaintyNode)
        top = float(array.max()) if array.size else 0.0
    if threshold is None:
        threshold = overlayThreshold(uncertaintyNode)
    top = top if top > 0 else 1e-6
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    display.SetInterpolate(False)
    display.AutoThresholdOff()
    display.SetLowerThreshold(float(threshold))
    display.SetUpperThreshold(max(top, float(threshold)) + 1.0)
    display.SetApplyThreshold(1)
    uncertaintyNode.SetAttribute(ATTRIBUTE_PREFIX + "ColorMap", colorMap)
    uncertaintyNode.SetAttribute(ATTRIBUTE_PREFIX + "Threshold", repr(float(threshold)))


def overlayThreshold(uncertaintyNode) -> float:
    """The overlay's threshold as last set (saved with the scene as a node attribute)."""
    try:
        return float(uncertaintyNode.GetAttribute(ATTRIBUTE_PREFIX + "Threshold") or DEFAULT_THRESHOLD)
    except ValueError:
        return DEFAULT_THRESHOLD


def uncertaintyRange(uncertaintyNode) -> tuple[float, float]:
    """(0, the map's maximum) - for the threshold control."""
    array = _slicer().util.arrayFromVolume(uncertaintyNode)
    return 0.0, float(array.max()) if array.size else 0.0


def showColorLegend(displayableNode, visible: bool = True, title: str = UNCERTAINTY_TITLE,
                    units: str = LEGEND_UNITS):
    """The colour legend of ``displayableNode`` in the views that show it, titled with the values' units.

    Returns the ``vtkMRMLColorLegendDisplayNode`` (None when hidden and there is none)."""
    slicer = _slicer()
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(displayableNode)
    if legend is None:
        if not visible:
            return None
        legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(displayableNode)
        if legend is None:  # pragma: no cover - a node without a colour table
            return None
    legend.SetTitleText(f"{title}\n({units})")
    legend.SetLabelFormat("%.3f")
    legend.SetVisibility(bool(visible))
    return legend


def segmentsMask(segmentationNode, volumeNode, marginVoxels: int = SEGMENTS_MARGIN_VOXELS) -> np.ndarray:
    """The union of the segments on ``volumeNode``'s grid (``[K, J, I]`` bool), grown by ``marginVoxels``."""
    slicer = _slicer()
    shape = tuple(reversed(dimensions(volumeNode)))
    mask = np.zeros(shape, bool)
    segmentation = segmentationNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        if array is not None and array.shape == shape:
            mask |= array.astype(bool)
    if marginVoxels > 0 and mask.any():
        import SimpleITK as sitk  # bundled with Slicer

        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        mask = sitk.GetArrayFromImage(sitk.BinaryDilate(image, [int(marginVoxels)] * 3)).astype(bool)
    return mask


def segmentsOverlayNode(uncertaintyNode, segmentationNode, volumeNode, marginVoxels: int = SEGMENTS_MARGIN_VOXELS):
    """A copy of the uncertainty map that is 0 outside the segments (plus a margin), made from the segments as
    they are now, referenced from the uncertainty node (so it is saved and found again with the scene).
    The original map is not changed (exports use it)."""
    scene = uncertaintyNode.GetScene()
    values = np.array(_slicer().util.arrayFromVolume(uncertaintyNode), dtype=np.float32)
    values[~segmentsMask(segmentationNode, volumeNode, marginVoxels)] = 0.0
    node = uncertaintyNode.GetNodeReference(SEGMENTS_OVERLAY_REFERENCE)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{uncertaintyNode.GetName()} near segments"))
        node.SetAttribute(ATTRIBUTE_PREFIX + "Model", uncertaintyNode.GetAttribute(ATTRIBUTE_PREFIX + "Model") or "")
        node.SetAttribute(ATTRIBUTE_PREFIX + "DerivedFrom", uncertaintyNode.GetID())
        uncertaintyNode.SetNodeReferenceID(SEGMENTS_OVERLAY_REFERENCE, node.GetID())
    _slicer().util.updateVolumeFromArray(node, values)
    copyGeometry(uncertaintyNode, node)
    if uncertaintyNode.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(uncertaintyNode.GetTransformNodeID())
    _low, top = uncertaintyRange(uncertaintyNode)
    setUncertaintyDisplay(node, uncertaintyNode.GetAttribute(ATTRIBUTE_PREFIX + "ColorMap") or DEFAULT_COLOR_MAP,
                          overlayThreshold(uncertaintyNode), top=top)
    return node


def showUncertaintyOverlay(scene, volumeNode, uncertaintyNode, *, visible: bool = True, opacity: float | None = None,
                           threshold: float | None = None, nearSegmentsOf=None, legend: bool = True):
    """Show the uncertainty over ``volumeNode`` in every slice view: thresholded, with its legend, over the
    whole image or (``nearSegmentsOf``: the segmentation node) only near the segments. Returns the node
    shown (None when hidden)."""
    if threshold is not None:
        setUncertaintyDisplay(uncertaintyNode, uncertaintyNode.GetAttribute(ATTRIBUTE_PREFIX + "ColorMap")
                              or DEFAULT_COLOR_MAP, threshold)
    masked = uncertaintyNode.GetNodeReference(SEGMENTS_OVERLAY_REFERENCE)
    shown = uncertaintyNode
    if visible and nearSegmentsOf is not None:
        shown = segmentsOverlayNode(uncertaintyNode, nearSegmentsOf, volumeNode)
    for node in (uncertaintyNode, masked):
        if node is not None and node is not shown:
            showOverlay(scene, volumeNode, node, visible=False)
            showColorLegend(node, False)
    if not visible:
        showOverlay(scene, volumeNode, shown, visible=False)
        showColorLegend(shown, False)
        return None
    showOverlay(scene, volumeNode, shown, opacity=opacity, visible=True)
    showColorLegend(shown, bool(legend))
    return shown


def createUncertaintyNode(scene, volumeNode, uncertainty_kji: np.ndarray, name: str,
                          colorMap: str = DEFAULT_COLOR_MAP):
    """A float32 scalar volume with ``volumeNode``'s exact IJK→RAS holding ``uncertainty_kji``."""
    slicer = _slicer()
    array = np.asarray(uncertainty_kji, dtype=np.float32)
    volumeShape = tuple(reversed(dimensions(volumeNode)))
    if array.shape != volumeShape:
        raise ValueError(f"uncertainty map of shape {array.shape} does not match the volume's {volumeShape}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    copyGeometry(volumeNode, node)
    if volumeNode.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    setUncertaintyDisplay(node, colorMap)
    return node


# -- files through storage nodes ----------------------------------------------------------------------


def writeVolumeNode(volumeNode, path: str, compress: bool = False) -> None:
    """Write the volume through a storage node that is not added to the scene."""
    slicer = _slicer()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volumeNode):
        raise OSError(f"could not write {volumeNode.GetName()!r} to {path}")


def readVolumeFile(path: str, label: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Read a volume file through a storage node into a node outside the scene.

    Returns ``(array [K, J, I] (a copy), IJK→RAS 4×4, dimensions (I, J, K))``.
    """
    slicer = _slicer()
    node = slicer.vtkMRMLLabelMapVolumeNode() if label else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetCenterImage(0)
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise OSError(f"could not read {path}")
    return np.array(slicer.util.arrayFromVolume(node)), ijkToRasArray(node), dimensions(node)


def checkSameGrid(volumeNode, dims, ijkToRas: np.ndarray, what: str) -> None:
    """Raise unless a file read back lies on ``volumeNode``'s grid (NIfTI keeps float32 geometry)."""
    if not sameGrid(dimensions(volumeNode), ijkToRasArray(volumeNode), dims, ijkToRas):
        raise RuntimeError(f"{what} is not on the input volume's voxel grid (size {tuple(dims)}, "
                           f"input {dimensions(volumeNode)}); refusing to load it")


# -- views ---------------------------------------------------------------------------------------------------


def showOverlay(scene, backgroundNode, foregroundNode, opacity: float | None = None, visible: bool = True) -> int:
    """Show ``foregroundNode`` over ``backgroundNode`` in every slice view of ``scene``.

    ``visible=False`` removes ``foregroundNode`` from the views where it is the foreground.
    Returns the number of slice views changed.
    """
    changed = 0
    compositeNodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(compositeNodes.GetNumberOfItems()):
        composite = compositeNodes.GetItemAsObject(i)
        if visible:
            if backgroundNode is not None:
                composite.SetBackgroundVolumeID(backgroundNode.GetID())
            composite.SetForegroundVolumeID(foregroundNode.GetID() if foregroundNode is not None else None)
            if opacity is not None:
                composite.SetForegroundOpacity(float(opacity))
            changed += 1
        elif foregroundNode is not None and composite.GetForegroundVolumeID() == foregroundNode.GetID():
            composite.SetForegroundVolumeID(None)
            changed += 1
    return changed


def setOverlayOpacity(scene, opacity: float) -> None:
    compositeNodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(compositeNodes.GetNumberOfItems()):
        compositeNodes.GetItemAsObject(i).SetForegroundOpacity(float(opacity))


def jumpSlices(scene, ras: Iterable[float], centred: bool = True) -> None:
    """Move every slice view of ``scene`` to the RAS point (as Slicer's "jump to" does)."""
    slicer = _slicer()
    r, a, s = (float(v) for v in ras)
    if centred:
        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    else:
        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s)
