"""MedDiffSeg: organ segmentation of CT/MRI with diffusion models, with an uncertainty overlay.

The module is thin: GUI (Widget) and MRML I/O (Logic). The work is done by the ``MedDiffSegLib``
library; the Qt-free helpers (geometry conversion, result nodes, worker process, progress lines,
presets, dependencies) live in ``MedDiffSegLogicLib`` beside this file so they can be tested on
real MRML without the desktop application.

- ``MedDiffSegLogic().segment(volumeNode, organs, ...)`` runs in this process (scripts, tests).
- The Widget runs the same work in a background process (``python -m MedDiffSegLib.inference.worker``)
  polled by a QTimer: progress with remaining time, Cancel kills the whole process tree and leaves
  the scene exactly as it was.
- Export: ``MedDiffSegLogic().exportDicomSeg(result)`` writes a DICOM-SEG and the uncertainty as a
  DICOM Parametric Map for a volume loaded from the DICOM database and adds them to it;
  ``exportSegmentationFiles`` writes .seg.nrrd + NIfTI (the way out for other volumes).

Slicer's own process never imports torch or initialises CUDA for the panel: models are listed and
installed from their ``model.json`` (``MedDiffSegLib.registry``'s torch-free functions), the
compute device is asked of a worker process (``--device-info``), and the Python packages are
installed on the first Segment, after one question (``MedDiffSegLogicLib.dependencies``).
"""

import logging
import os
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedDiffSegLogicLib import dependencies, dicomexport, nodes, presets
from MedDiffSegLogicLib import modality as modalityLib
from MedDiffSegLogicLib import models as modelsLib
from MedDiffSegLogicLib.process import DeviceProbeError, probeDevice
from MedDiffSegLogicLib.progress import formatDuration
from MedDiffSegLogicLib.segmentation import (
    BackgroundSegmentation,
    MedDiffSegResult,
    SegmentOptions,
    resultFromNodes,
    segmentInProcess,
)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
dependencies.ensureLibraryOnPath(MODULE_DIR)

INSTALL_FROM_FILE = "__install_from_file__"
#: Item data of "Install NAME from the catalogue..." in the model list: this prefix, then the package name.
INSTALL_FROM_CATALOGUE = "__install_from_catalogue__:"
POLL_INTERVAL_MS = 200
#: How often Refine mode reads the worker's answers (a correction shows up at most this much later).
REFINE_POLL_INTERVAL_MS = 100
#: Ask before starting a CPU run estimated to take longer than this.
CONFIRM_CPU_SECONDS = 15 * 60


#
# MedDiffSeg
#


class MedDiffSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffSeg contributors (MedDiffSeg project)"]
        self.parent.helpText = _(
            "Segment organs in a CT or MR volume with a diffusion model. Choose the volume, the model and "
            "the organs, pick a quality (more samples = a more reliable uncertainty map, more time) and "
            "click <b>Segment</b>. The segmentation and an <b>uncertainty</b> volume (where the diffusion "
            "samples disagree) are added to the scene; review the uncertain regions, edit in Segment Editor "
            "if needed, then export: <b>Export DICOM-SEG</b> (for a volume loaded from the DICOM database) writes "
            "a DICOM Segmentation and the uncertainty as a DICOM Parametric Map and adds them to the DICOM "
            "database; <b>Export files</b> writes .seg.nrrd and NIfTI. Runs in a background process: Slicer "
            "stays responsive and the run can be cancelled. See the <a href=\"https://github.com/meddiffseg/SlicerMedDiffSeg\">documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "MedDiffSeg builds on MONAI, diffusers, SimpleITK and PyTorch, and follows the conventions of "
            "Slicer's scripted module template, SlicerNNUnet and SlicerMONAIAuto3DSeg."
        )


#
# Parameter node
#


@parameterNodeWrapper
class MedDiffSegParameterNode:
    """Everything the GUI shows, saved with the scene.

    inputVolume - the volume to segment.
    outputSegmentation - where segments go; None: a new segmentation node per run.
    model - name of the model package (empty: the default model).
    organs - organ names checked in the organ list.
    quality - Fast / Standard / Thorough; sets samples and staple.
    samples, steps (0 = model default), seed, device, staple, largestComponent - run settings.
    showUncertainty, uncertaintyOpacity, colorMap, uncertaintyThreshold (transparent below),
    uncertaintyInSegmentsOnly, showLegend - the overlay of the last result.
    uncertaintyVolume, resultSegmentation - the last result's nodes: saved with the scene, so that the
    results table, jump-to-slice and the overlay come back when the scene is loaded again.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    organs: list[str]
    quality: Annotated[str, Choice(list(presets.QUALITY_PRESETS))] = presets.DEFAULT_PRESET
    samples: Annotated[int, WithinRange(1, 100)] = presets.QUALITY_PRESETS[presets.DEFAULT_PRESET].samples
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    device: Annotated[str, Choice(list(presets.DEVICES))] = "Auto"
    staple: bool = False
    largestComponent: bool = False
    showUncertainty: bool = True
    uncertaintyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    colorMap: Annotated[str, Choice(list(nodes.COLOR_MAPS))] = nodes.DEFAULT_COLOR_MAP
    uncertaintyThreshold: Annotated[float, WithinRange(0.0, nodes.UNCERTAINTY_MAX)] = nodes.DEFAULT_THRESHOLD
    uncertaintyInSegmentsOnly: bool = False
    showLegend: bool = True
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    resultSegmentation: vtkMRMLSegmentationNode


#
# MedDiffSegWidget
#


class MedDiffSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: settings, Segment/Cancel, progress, results, the uncertainty overlay, model management."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedDiffSegLogic | None = None
        self._parameterNode: MedDiffSegParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: BackgroundSegmentation | None = None
        self._batch: list = []
        self._batchTotal = 0
        self._results: list[MedDiffSegResult] = []  # this run's (or batch's) results, in order
        self._lastResult: MedDiffSegResult | None = None  # the result the overlay, jump and export act on
        self._timer = None
        self._modelTimer = None
        self._modelJob: modelsLib.ModelInstallJob | None = None
        self._modelRows: list = []
        self._updatingOrgans = False
        self._currentVolumeName = ""
        self._batchRefreshPending = False
        self._packages: list = []
        self._volumeModality = None  # modalityLib.VolumeModality of the input volume (None: no volume)
        self._modalityVolumeId = None  # the input volume it was computed for
        self._allowModalityMismatch = False  # the user confirmed running a model on another modality
        self._refine = None  # MedDiffSegLogicLib.refine.RefineController while in Refine mode
        self._refineStopping: list = []  # controllers whose worker is being stopped in the background
        self._refineTimer = None
        self._refineShortcuts: list = []

    # -- setup --------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedDiffSegLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)
        self._modelTimer = qt.QTimer()
        self._modelTimer.setInterval(POLL_INTERVAL_MS)
        self._modelTimer.connect("timeout()", self.onModelJobTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)  # user choices only
        self.ui.organsListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganItemChanged)
        self.ui.selectAllOrgansButton.connect("clicked(bool)", lambda: self.setAllOrgansChecked(True))
        self.ui.selectNoOrgansButton.connect("clicked(bool)", lambda: self.setAllOrgansChecked(False))
        # "activated": only a choice made by the user applies the preset (not a scene being loaded)
        self.ui.qualityComboBox.connect("activated(int)", self.onQualityChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.batchSegmentButton.connect("clicked(bool)", self.onBatchSegmentButton)
        self.ui.refreshBatchButton.connect("clicked(bool)", self.refreshBatchList)
        self.ui.resultsTableWidget.connect("cellDoubleClicked(int,int)", self.onResultRowDoubleClicked)
        self.ui.jumpOrganComboBox.connect("currentIndexChanged(int)", self.onJumpOrganChanged)
        self.ui.jumpToUncertainButton.connect("clicked(bool)", self.onJumpToUncertain)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.onOverlaySettingsChanged)
        self.ui.uncertaintyOpacitySlider.connect("valueChanged(double)", self.onOverlaySettingsChanged)
        self.ui.uncertaintyThresholdSlider.connect("valueChanged(double)", self.onOverlaySettingsChanged)
        self.ui.uncertaintyInSegmentsCheckBox.connect("toggled(bool)", self.onOverlaySettingsChanged)
        self.ui.uncertaintyLegendCheckBox.connect("toggled(bool)", self.onOverlaySettingsChanged)
        self.ui.colorMapComboBox.connect("currentIndexChanged(int)", self.onColorMapChanged)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.exportFilesButton.connect("clicked(bool)", self.onExportFiles)
        self.ui.modelsTableWidget.connect("cellClicked(int,int)", self.onModelRowSelected)
        self.ui.installModelFileButton.connect("clicked(bool)", self.onInstallModelFromFile)
        self.ui.installModelUrlButton.connect("clicked(bool)", self.onInstallModelFromUrl)
        self.ui.updateModelButton.connect("clicked(bool)", self.onUpdateModelFromUrl)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)

        self.ui.resultsTableWidget.setColumnCount(4)
        self.ui.resultsTableWidget.setHorizontalHeaderLabels([_("Volume"), _("Organ"), _("Volume (mL)"),
                                                              _("Mean uncertainty")])
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.modelsTableWidget.setColumnCount(len(modelsLib.HEADERS))
        self.ui.modelsTableWidget.setHorizontalHeaderLabels([_(h) for h in modelsLib.HEADERS])
        self.ui.modelsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.uncertaintyThresholdSlider.toolTip = self.ui.uncertaintyThresholdSlider.toolTip or _(
            "Transparent below this uncertainty.")
        self.ui.progressBar.hide()
        self.ui.modelInstallProgressBar.hide()

        self.setupRefine()

        self.populateModels()
        self.refreshBatchList()
        self.initializeParameterNode()
        self.updateDependencyHint()
        self.updateGUIState()

    def cleanup(self) -> None:
        self.stopRefine(wait=False)
        if self._job is not None and not self._job.finished:
            self._job.cancel(wait=False)
        if self._modelJob is not None and not self._modelJob.finished:
            self._modelJob.cancel()
        for timer in (self._timer, self._modelTimer, self._refineTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and not self._job.finished:
            self._job.cancel(wait=False)
            self._batch = []
            self._finishJobUI(_("Cancelled: the scene was closed."))
        self.clearResults()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller=None, event=None) -> None:
        """A scene was loaded: take its parameter node and show the result it refers to."""
        self.clearResults()
        self.initializeParameterNode()

    def onSceneNodesChanged(self, caller=None, event=None) -> None:
        if self._job is None and not self._batchRefreshPending:
            self._batchRefreshPending = True  # one refresh for a burst of added/removed nodes
            qt.QTimer.singleShot(0, self.refreshBatchList)

    # -- parameter node -----------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode") and not first.GetAttribute(nodes.ATTRIBUTE_PREFIX + "Model"):
                self._parameterNode.inputVolume = first
        self.restoreResults()

    def setParameterNode(self, inputParameterNode: MedDiffSegParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
            self.selectModelInCombo(self._parameterNode.model)
        self.updateGUIState()

    def restoreResults(self) -> None:
        """Show the result the parameter node refers to (after a scene was loaded) when none is shown."""
        p = self._parameterNode
        if self._results or p is None or not p.resultSegmentation:
            return
        result = self.logic.resultFromNodes(p.resultSegmentation)
        if result is not None:
            self._results = [result]
            self.fillResultsTable()
            self.selectResult(0, showOverlay=True)

    def updateGUIState(self, caller=None, event=None) -> None:
        """Enable/disable buttons and refresh texts from the current state."""
        running = self._job is not None
        p = self._parameterNode
        if not running:
            self.updateVolumeModality()
        if running:
            self.ui.segmentButton.text = _("Cancel")
            self.ui.segmentButton.toolTip = _("Stop the segmentation; nothing is added to the scene.")
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.text = _("Segment")
            ready, reason = self.readyToSegment()
            self.ui.segmentButton.enabled = ready
            self.ui.segmentButton.toolTip = reason or _("Run the segmentation in a background process.")
        for w in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton,
                  self.ui.batchSegmentButton):
            w.enabled = not running
        if p is not None:
            preset = presets.QUALITY_PRESETS.get(p.quality)
            self.ui.qualityDescriptionLabel.text = preset.description if preset else ""
        result = self._lastResult
        self.ui.jumpToUncertainButton.enabled = result is not None and result.hasReviewTarget
        self.ui.uncertaintyCollapsibleButton.enabled = bool(p and p.uncertaintyVolume)
        for w in (self.ui.showUncertaintyCheckBox, self.ui.uncertaintyOpacitySlider, self.ui.uncertaintyThresholdSlider,
                  self.ui.uncertaintyInSegmentsCheckBox, self.ui.uncertaintyLegendCheckBox, self.ui.colorMapComboBox):
            w.enabled = result is None or result.hasUncertainty
        self.updateExportState(running)
        self.updateModelButtons()
        self.updateRefineState()

    def updateDependencyHint(self) -> None:
        """Say in the panel, before any click, what the first Segment will install (nothing is imported)."""
        try:
            plan = self.logic.dependencyPlan()
        except Exception as exc:
            logging.warning("MedDiffSeg: cannot check the Python packages: %s", exc)
            return
        if not plan.satisfied and not self.ui.statusLabel.text:
            self.ui.statusLabel.text = _("The first Segment installs what MedDiffSeg needs in Slicer's Python "
                                         "(after asking): {items}.").format(items="; ".join(plan.items()))

    def updateExportState(self, running: bool = False) -> None:
        """Export DICOM-SEG only for a result on a volume from the DICOM database; say why otherwise."""
        result = self._lastResult
        alive = (result is not None and all(n is not None and n.GetScene() is not None
                                            for n in (result.segmentationNode, result.volumeNode)))
        self.ui.exportFilesButton.enabled = alive and not running
        if not alive:
            self.ui.exportDicomSegButton.enabled = False
            self.ui.exportDicomSegButton.toolTip = _("Segment a volume first.")
            self.ui.exportInfoLabel.text = ""
            return
        try:
            possible, reason = self.logic.canExportDicomSeg(result.volumeNode)
        except Exception as exc:
            logging.warning("MedDiffSeg: cannot check the DICOM source: %s", exc)
            possible, reason = False, str(exc)
        self.ui.exportDicomSegButton.enabled = possible and not running
        self.ui.exportDicomSegButton.toolTip = reason if not possible else _(
            "Write a DICOM Segmentation of the organs (and the uncertainty as a DICOM Parametric Map) that "
            "references the input series, and add them to Slicer's DICOM database.")
        self.ui.exportInfoLabel.text = reason

    def readyToSegment(self) -> tuple[bool, str]:
        p = self._parameterNode
        if p is None or not p.inputVolume:
            return False, _("Choose an input volume.")
        if self.ui.modelComboBox.count == 0 or self.currentModelName() is None:
            return False, _("Install a model first (Model > Install from file...).")
        if not self.checkedOrgans():
            return False, _("Check at least one organ.")
        return True, ""

    # -- models and organs --------------------------------------------------------------------------
    def updateVolumeModality(self, force: bool = False) -> None:
        """When the input volume changed: find its modality (DICOM tag, else intensities), list the models
        made for it first, and switch to its default model if the chosen one is made for another modality."""
        p = self._parameterNode
        volume = p.inputVolume if p is not None else None
        volumeId = volume.GetID() if volume is not None else None
        if volumeId == self._modalityVolumeId and not force:
            return
        self._modalityVolumeId = volumeId
        self._volumeModality = None
        if volume is not None and volume.GetImageData() is not None:
            try:
                self._volumeModality = self.logic.volumeModality(volume)
            except Exception as exc:  # no modality, no filtering
                logging.warning("MedDiffSeg: cannot tell the modality of %s: %s", volume.GetName(), exc)
        current = self.currentModelName()
        select = current
        if current and self._volumeModality is not None and self._volumeModality.modality is not None:
            package = next((pk for pk in self._packages if pk.name == current), None)
            try:
                fits = package is None or self.logic.modelModality(package) == self._volumeModality.modality
            except Exception:
                fits = True
            if not fits:
                select = self.logic.defaultModelName(self._volumeModality.modality, self._packages) or current
        self.populateModels(select=select, reload=False)

    def populateModels(self, select: str | None = None, reload: bool = True) -> None:
        """Fill the model list (read from the packages' model.json; no torch needed): the models made for
        the input volume's modality first, then the others (marked with their modality), each grouped by
        method; then 'Install ... from the catalogue...' for the catalogue's packages that are not
        installed, and 'Install from file...'. Also fills the model management table."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if reload:
            try:
                self._packages = list(self.logic.listModels())
            except Exception as exc:  # e.g. an unreadable models folder: say so, keep the GUI usable
                logging.exception("MedDiffSeg: cannot list models")
                self._packages = []
                self.ui.modelInfoLabel.text = _("Cannot list the models: {error}").format(error=exc)
            self.populateModelsTable()
        volume = self._volumeModality
        fitting, others = modalityLib.splitByModality(self._packages, volume.modality if volume else None)
        self.addModelItems(fitting, otherModality=False)
        if fitting and others:
            combo.insertSeparator(combo.count)
        self.addModelItems(others, otherModality=True)
        if self._packages:
            combo.insertSeparator(combo.count)
        self.addCatalogueItems()
        combo.addItem(_("Install from file..."), INSTALL_FROM_FILE)
        combo.blockSignals(wasBlocked)
        self.selectModelInCombo(select if select is not None else (self._parameterNode.model if self._parameterNode else ""))

    def addModelItems(self, packages, otherModality: bool) -> None:
        """Add ``packages`` to the model list grouped by method ("method: name (version)"), a separator between
        methods; packages made for the other modality say theirs."""
        combo = self.ui.modelComboBox
        for i, (method, group) in enumerate(modelsLib.groupByMethod(packages)):
            if i:
                combo.insertSeparator(combo.count)
            for package in group:
                text = f"{method}: {package.name} ({package.version})"
                if otherModality:
                    try:
                        modality = self.logic.modelModality(package)
                    except Exception:
                        modality = "?"
                    text = _("{text} - {modality} model").format(text=text, modality=modality)
                combo.addItem(text, package.name)

    def addCatalogueItems(self) -> None:
        """Add "Install NAME from the catalogue..." for each package of the model catalogue that is not installed."""
        combo = self.ui.modelComboBox
        choices = modelsLib.catalogueChoices([p.name for p in self._packages])
        for choice in choices:
            combo.addItem(_("Install {label} from the catalogue...").format(label=choice.label),
                          INSTALL_FROM_CATALOGUE + choice.name)
        if choices:
            combo.insertSeparator(combo.count)

    @staticmethod
    def isModelAction(data) -> bool:
        """Whether a model-list item is an action (install from file or from the catalogue), not a model."""
        return data == INSTALL_FROM_FILE or str(data or "").startswith(INSTALL_FROM_CATALOGUE)

    def onInstallFromCatalogue(self, name: str) -> None:
        """Download and install catalogue package ``name`` in the background (progress under the model table)."""
        if self._modelJob is not None:
            slicer.util.warningDisplay(_("A model is being installed; wait until it is done."))
            self.populateModels(reload=False)
            return
        self.startModelJob(name, None, catalogue=name)

    def selectModelInCombo(self, name: str) -> None:
        """Select ``name``, else the default model for the volume's modality, else the first one; nothing
        when none is installed."""
        combo = self.ui.modelComboBox
        index = combo.findData(name) if name else -1
        if index < 0 and self.logic:
            modality = (self._volumeModality.modality if self._volumeModality is not None else None) or "CT"
            index = combo.findData(self.logic.defaultModelName(modality, self._packages))
        if index < 0 and combo.count > 1:
            index = 0
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index if index >= 0 and not self.isModelAction(combo.itemData(index)) else -1
        combo.blockSignals(wasBlocked)
        self.onModelChanged()

    def currentModelName(self) -> str | None:
        data = self.ui.modelComboBox.currentData
        return None if data in (None, "") or self.isModelAction(data) else str(data)

    def onModelActivated(self, index: int) -> None:
        data = self.ui.modelComboBox.itemData(index)
        if data == INSTALL_FROM_FILE:
            self.onInstallModelFromFile()
        elif self.isModelAction(data):
            self.onInstallFromCatalogue(str(data)[len(INSTALL_FROM_CATALOGUE):])

    def onModelChanged(self, index: int | None = None) -> None:
        name = self.currentModelName()
        if self._parameterNode is not None and name is not None and self._parameterNode.model != name:
            self._parameterNode.model = name
        self.populateOrgans(name)
        self.updateModalityWarning()
        self.updateGUIState()

    def updateModalityWarning(self) -> None:
        """Show a warning under the model list when the chosen model is not made for the volume's modality."""
        name = self.currentModelName()
        package = next((pk for pk in self._packages if pk.name == name), None)
        text = ""
        if package is not None and self._volumeModality is not None:
            try:
                text = modalityLib.mismatchWarning(package.name, self.logic.modelModality(package), self._volumeModality)
            except Exception as exc:
                logging.warning("MedDiffSeg: cannot read the modality of model %s: %s", name, exc)
        if text:
            text = "\u26a0 " + text + " " + _("Segment asks before running it anyway.")
        self.ui.modelModalityWarningLabel.text = text
        self.ui.modelModalityWarningLabel.visible = bool(text)

    def onInstallModelFromFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Install a MedDiffSeg model package"), "",
                                              _("Model package (*.zip)"))
        if not path:
            self.populateModels()
            return
        self.startModelJob(str(path), None)

    def populateOrgans(self, modelName: str | None) -> None:
        self._updatingOrgans = True
        widget = self.ui.organsListWidget
        widget.clear()
        info = ""
        if modelName:
            try:
                package = self.logic.modelPackage(modelName)
                checked = set(self._parameterNode.organs) if self._parameterNode else set()
                for organ in package.organs:
                    item = qt.QListWidgetItem(organ.display_name)
                    item.setData(qt.Qt.UserRole, organ.name)
                    item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                    item.setCheckState(qt.Qt.Checked if organ.name in checked else qt.Qt.Unchecked)
                    r, g, b = organ.color
                    item.setData(qt.Qt.DecorationRole, qt.QColor(r, g, b))
                    widget.addItem(item)
                info = self.logic.modelDescription(package)
            except Exception as exc:
                info = _("Cannot read model {name}: {error}").format(name=modelName, error=exc)
        self.ui.modelInfoLabel.text = info
        self._updatingOrgans = False

    def checkedOrgans(self) -> list[str]:
        widget = self.ui.organsListWidget
        return [widget.item(i).data(qt.Qt.UserRole) for i in range(widget.count)
                if widget.item(i).checkState() == qt.Qt.Checked]

    def onOrganItemChanged(self, item=None) -> None:
        if self._updatingOrgans or self._parameterNode is None:
            return
        self._parameterNode.organs = self.checkedOrgans()
        self.updateGUIState()

    def setAllOrgansChecked(self, checked: bool) -> None:
        widget = self.ui.organsListWidget
        self._updatingOrgans = True
        for i in range(widget.count):
            widget.item(i).setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
        self._updatingOrgans = False
        self.onOrganItemChanged()

    def onQualityChanged(self, index: int | None = None) -> None:
        p = self._parameterNode
        if p is None:
            return
        preset = presets.QUALITY_PRESETS.get(self.ui.qualityComboBox.currentText)
        if preset is None:
            return
        p.samples = preset.samples
        p.staple = preset.staple
        self.updateGUIState()

    # -- model management ---------------------------------------------------------------------------
    def populateModelsTable(self) -> None:
        table = self.ui.modelsTableWidget
        try:
            self._modelRows = modelsLib.modelRows()
        except Exception as exc:
            logging.exception("MedDiffSeg: cannot list models")
            self._modelRows = []
            self.ui.modelDetailsLabel.text = str(exc)
        table.setRowCount(len(self._modelRows))
        for row, model in enumerate(self._modelRows):
            for column, text in enumerate(model.cells()):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        self.updateModelButtons()

    def selectedModelRow(self):
        row = self.ui.modelsTableWidget.currentRow()
        return self._modelRows[row] if 0 <= row < len(self._modelRows) else None

    def onModelRowSelected(self, row: int = -1, column: int = 0) -> None:
        model = self.selectedModelRow()
        text = ""
        if model is not None:
            try:
                text = modelsLib.describe(model.name)
            except Exception as exc:
                text = _("Cannot read model {name}: {error}").format(name=model.name, error=exc)
        self.ui.modelDetailsLabel.text = text
        self.updateModelButtons()

    def updateModelButtons(self) -> None:
        busy = self._modelJob is not None
        model = self.selectedModelRow()
        self.ui.removeModelButton.enabled = bool(model and model.removable) and not busy and self._job is None
        self.ui.removeModelButton.toolTip = (
            _("Select a model in the table.") if model is None else
            _("Delete {name} from your models folder.").format(name=model.name) if model.removable else
            _("{name} is built into MedDiffSeg and cannot be removed.").format(name=model.name))
        self.ui.updateModelButton.enabled = model is not None and not busy
        self.ui.installModelFileButton.enabled = not busy
        self.ui.installModelUrlButton.enabled = True  # it is the Cancel button while a download runs
        self.ui.installModelUrlButton.text = _("Cancel download") if busy else _("Install from URL")

    def onInstallModelFromUrl(self) -> None:
        if self._modelJob is not None:
            self._modelJob.cancel()
            return
        url, sha256 = self.ui.modelUrlLineEdit.text.strip(), self.ui.modelSha256LineEdit.text.strip()
        if not url:
            slicer.util.warningDisplay(_("Enter the URL of the model package (and its SHA-256) first."))
            return
        self.startModelJob(url, sha256)

    def onUpdateModelFromUrl(self) -> None:
        model = self.selectedModelRow()
        if model is None or self._modelJob is not None:
            return
        source, sha256 = self.ui.modelUrlLineEdit.text.strip(), self.ui.modelSha256LineEdit.text.strip()
        if not source:
            source = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(),
                                                    _("The new version of {name}").format(name=model.name), "",
                                                    _("Model package (*.zip)"))
            if not source:
                return
        self.startModelJob(str(source), sha256, update=model.name)

    def startModelJob(self, source: str, sha256: str | None, update: str | None = None, force: bool = False,
                      catalogue: str | None = None) -> None:
        """Install or update a package in the background (a URL is downloaded; progress below the table);
        ``catalogue``: install that package of the model catalogue."""
        self._modelJob = self.logic.startModelInstall(source, sha256 or None, update=update, force=force,
                                                      catalogue=catalogue)
        self.ui.modelInstallProgressBar.value = 0
        self.ui.modelInstallProgressBar.show()
        self.ui.modelDetailsLabel.text = (_("Updating {name}...").format(name=update) if update else
                                          _("Installing {name} from the catalogue...").format(name=catalogue) if catalogue
                                          else _("Installing {source}...").format(source=source))
        self._modelTimer.start()
        self.updateModelButtons()

    def onModelJobTimer(self) -> None:
        job = self._modelJob
        if job is None:
            self._modelTimer.stop()
            return
        stage, fraction, message = job.poll()
        self.ui.modelInstallProgressBar.value = int(round(max(fraction, 0.0) * 1000))
        self.ui.modelDetailsLabel.text = f"{stage}: {message}" if message else stage
        if not job.finished:
            return
        self._modelTimer.stop()
        self._modelJob = None
        self.ui.modelInstallProgressBar.hide()
        if job.error:
            self.ui.modelDetailsLabel.text = job.error
            if not job.cancelled:
                slicer.util.errorDisplay(_("Installing the model failed: {error}").format(error=job.error))
            self.populateModels()
            return
        package = job.result
        if job.update:
            text = _("Updated {name} from {old} to {new}.").format(name=package.name, old=job.previous.version,
                                                                  new=package.version)
        else:
            text = _("Installed model {name} {version}.").format(name=package.name, version=package.version)
        self.ui.modelDetailsLabel.text = text
        slicer.util.showStatusMessage(text, 5000)
        self.populateModels(select=package.name)

    def onRemoveModel(self) -> None:
        model = self.selectedModelRow()
        if model is None or not model.removable:
            return
        if not slicer.util.confirmOkCancelDisplay(_("Delete model {name} {version} from your models folder?").format(
                name=model.name, version=model.version)):
            return
        try:
            path = self.logic.removeModel(model.name)
        except Exception as exc:
            slicer.util.errorDisplay(_("Removing the model failed: {error}").format(error=exc))
            return
        self.ui.modelDetailsLabel.text = _("Removed {name} ({path}).").format(name=model.name, path=path)
        self.populateModels()

    # -- batch list -----------------------------------------------------------------------------------
    def refreshBatchList(self) -> None:
        self._batchRefreshPending = False
        widget = self.ui.batchVolumesListWidget
        checked = {widget.item(i).data(qt.Qt.UserRole) for i in range(widget.count)
                   if widget.item(i).checkState() == qt.Qt.Checked}
        widget.clear()
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(nodes.ATTRIBUTE_PREFIX + "Model"):
                continue  # label maps and our own uncertainty maps are not inputs
            item = qt.QListWidgetItem(node.GetName())
            item.setData(qt.Qt.UserRole, node.GetID())
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
            widget.addItem(item)

    # -- running --------------------------------------------------------------------------------------
    def currentOptions(self) -> SegmentOptions:
        p = self._parameterNode
        return SegmentOptions(
            organs=self.checkedOrgans(), model=self.currentModelName(), samples=int(p.samples),
            steps=int(p.steps) or None, seed=int(p.seed), device=presets.deviceName(p.device),
            staple=bool(p.staple), largestComponent=bool(p.largestComponent),
            allowModalityMismatch=self._allowModalityMismatch,
        )

    def onSegmentButton(self) -> None:
        if self._job is not None:
            self.onCancel()
            return
        self.startQueue([self._parameterNode.inputVolume])

    def onBatchSegmentButton(self) -> None:
        widget = self.ui.batchVolumesListWidget
        volumes = [slicer.mrmlScene.GetNodeByID(widget.item(i).data(qt.Qt.UserRole)) for i in range(widget.count)
                   if widget.item(i).checkState() == qt.Qt.Checked]
        volumes = [v for v in volumes if v is not None]
        if not volumes:
            slicer.util.warningDisplay(_("Check the volumes to segment in the Batch list first."))
            return
        self.startQueue(volumes)

    def ensureDependencies(self) -> bool:
        """Install what is missing after one question; on a refusal or a failure say why and keep the panel."""
        result = self.logic.ensureDependencies(confirm=lambda question: slicer.util.confirmOkCancelDisplay(
            question, windowTitle=_("MedDiffSeg - install Python packages")))
        if result:
            if result.installed:
                self.ui.statusLabel.text = _("Installed: {what}.").format(what=", ".join(result.installed))
            return True
        self.ui.statusLabel.text = result.message
        if not result.declined:
            slicer.util.errorDisplay(result.message, detailedText=result.details or None)
        self.updateGUIState()
        return False

    def startQueue(self, volumes: list) -> None:
        if not self.ensureDependencies():
            return
        if not self.confirmModality(volumes):
            return
        options = self.currentOptions()
        if not self.confirmDevice(volumes, options):
            return
        self.clearResults()
        self._batch = list(volumes)
        self._batchTotal = len(volumes)
        self.startNext()

    def confirmModality(self, volumes: list) -> bool:
        """Ask before running the model on volumes of another modality; remember the answer for this run."""
        self._allowModalityMismatch = False
        model = self.currentModelName()
        warnings = []
        for volume in volumes:
            try:
                known = self._volumeModality if volume.GetID() == self._modalityVolumeId else None
                text = self.logic.modalityWarning(volume, model, known)
            except Exception as exc:
                logging.warning("MedDiffSeg: cannot check the modality of %s: %s", volume.GetName(), exc)
                continue
            if text:
                warnings.append(f"{volume.GetName()}: {text}" if len(volumes) > 1 else text)
        if not warnings:
            return True
        question = "\n".join(warnings) + "\n\n" + _("The results would be meaningless. Segment anyway?")
        if not slicer.util.confirmOkCancelDisplay(question):
            return False
        self._allowModalityMismatch = True
        return True

    def confirmDevice(self, volumes: list, options: SegmentOptions) -> bool:
        """Say which device will be used (asked of a worker process); on CPU give an estimate and ask before a
        long run."""
        self.ui.statusLabel.text = _("Checking the compute device...")
        try:
            with slicer.util.WaitCursor():
                description, isGpu = self.logic.deviceInfo(options.device)
        except Exception as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc))
            return False
        if isGpu:
            self.ui.statusLabel.text = _("Device: {device}").format(device=description)
            return True
        seconds = sum(self.logic.estimateSeconds(v, options) for v in volumes)
        text = _("No GPU available: the CPU ({device}) will be used. Rough estimate: {time}.").format(
            device=description, time=formatDuration(seconds))
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 10000)
        if seconds > CONFIRM_CPU_SECONDS:
            return slicer.util.confirmOkCancelDisplay(text + "\n\n" + _("Start anyway? (Fast quality or fewer organs is quicker.)"))
        return True

    def startNext(self) -> None:
        if not self._batch:
            return
        volume = self._batch.pop(0)
        p = self._parameterNode
        try:
            self._job = self.logic.startBackgroundSegmentation(
                volume, self.currentOptions(), segmentationNode=p.outputSegmentation if self._batchTotal == 1 else None,
                colorMap=p.colorMap)
        except Exception as exc:
            self._job = None
            logging.exception("MedDiffSeg: could not start")
            slicer.util.errorDisplay(_("Could not start the segmentation: {error}").format(error=exc))
            self._batch = []
            self.updateGUIState()
            return
        self._currentVolumeName = volume.GetName()
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.progressLabel.text = self.queuePrefix() + _("Starting...")
        self._timer.start()
        self.updateGUIState()

    def queuePrefix(self) -> str:
        if self._batchTotal <= 1:
            return ""
        done = self._batchTotal - len(self._batch)
        return _("Volume {index}/{total} ({name}): ").format(index=done, total=self._batchTotal, name=self._currentVolumeName)

    def onPollTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        try:
            job.poll()
        except Exception:
            logging.exception("MedDiffSeg: polling the worker failed")
            job.cancel(wait=False)
        tracker = job.tracker
        self.ui.progressBar.value = int(round(tracker.fraction * 1000))
        self.ui.progressLabel.text = self.queuePrefix() + tracker.text()
        if not job.finished:
            return
        self._timer.stop()
        if job.state == "succeeded":
            try:
                result = job.loadResults()
            except Exception as exc:
                logging.exception("MedDiffSeg: reading the results failed")
                self._batch = []
                self._finishJobUI(None)
                slicer.util.errorDisplay(_("Reading the results failed: {error}").format(error=exc))
                return
            self.showResult(result)
            self._finishJobUI(_("Done in {time} on {device}.").format(time=formatDuration(result.durationSeconds),
                                                                       device=result.device or tracker.device)
                              + self.oneSampleNote(result))
            if self._batch:
                self.startNext()
            return
        if job.state == "cancelled":
            self._batch = []
            self._finishJobUI(_("Cancelled; the scene was left as it was."))
            return
        logging.error("MedDiffSeg: segmentation failed: %s\n%s\n%s", job.errorMessage, job.errorDetails,
                      "\n".join(job.logLines[-50:]))
        self._batch = []
        self._finishJobUI(_("Failed: {message}").format(message=job.errorMessage))
        slicer.util.errorDisplay(_("The segmentation failed: {message}").format(message=job.errorMessage),
                                 detailedText=(job.errorDetails or "") + "\n".join(job.logLines[-50:]))

    def onCancel(self) -> None:
        """Cancel at once: the worker's process tree is ended in the background, nothing enters the scene."""
        self._batch = []
        if self._job is not None:
            self._job.cancel(wait=False)
        self._timer.stop()
        self._finishJobUI(_("Cancelled; the scene was left as it was."))

    def _finishJobUI(self, message: str | None) -> None:
        self._job = None
        self.ui.progressBar.hide()
        self.ui.progressLabel.text = ""
        if message:
            self.ui.statusLabel.text = message
        self.refreshBatchList()
        self.updateGUIState()

    # -- results --------------------------------------------------------------------------------------
    @staticmethod
    def oneSampleNote(result: MedDiffSegResult) -> str:
        if result.hasUncertainty:
            return ""
        return " " + _("One sample was drawn, so there is no uncertainty map: a single sample cannot disagree with "
                       "itself. Choose Standard or Thorough quality (5 or 10 samples) to see where the model is unsure.")

    def clearResults(self) -> None:
        self.stopRefine(wait=False)
        self._results = []
        self._lastResult = None
        self.ui.resultsTableWidget.setRowCount(0)
        wasBlocked = self.ui.jumpOrganComboBox.blockSignals(True)
        self.ui.jumpOrganComboBox.clear()
        self.ui.jumpOrganComboBox.blockSignals(wasBlocked)
        self.ui.uncertaintyInfoLabel.text = ""

    def showResult(self, result: MedDiffSegResult) -> None:
        """Add ``result`` to the results (every volume of a batch keeps its rows) and show its overlay."""
        self._results.append(result)
        self.fillResultsTable()
        self.selectResult(len(self._results) - 1, showOverlay=True)
        result.segmentationNode.CreateClosedSurfaceRepresentation()

    def fillResultsTable(self) -> None:
        table = self.ui.resultsTableWidget
        rows = [(index, result, organ) for index, result in enumerate(self._results) for organ in result.organs]
        table.setRowCount(len(rows))
        combo = self.ui.jumpOrganComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for row, (index, result, organ) in enumerate(rows):
            meanUnc = organ.get("mean_uncertainty")
            volumeName = result.volumeNode.GetName() if result.volumeNode is not None else "?"
            cells = [volumeName, organ.get("display_name", organ.get("name", "")),
                     f"{float(organ.get('volume_ml', 0.0)):.1f}",
                     "-" if meanUnc is None or not result.hasUncertainty else f"{float(meanUnc):.4g}"]
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
            label = organ.get("display_name", organ["name"])
            combo.addItem(f"{volumeName}: {label}" if len(self._results) > 1 else label, f"{index}|{organ['name']}")
        combo.blockSignals(wasBlocked)

    def selectResult(self, index: int, showOverlay: bool = False) -> None:
        """Make ``self._results[index]`` the result the overlay, jump and export act on."""
        if not 0 <= index < len(self._results):
            return
        result = self._results[index]
        changed = result is not self._lastResult
        if changed and self._refine is not None:
            self.stopRefine(wait=False)  # Refine mode works on one result
        self._lastResult = result
        combo = self.ui.jumpOrganComboBox
        if not str(combo.currentData or "").startswith(f"{index}|"):  # show one of its organs in the jump list
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = next((i for i in range(combo.count) if str(combo.itemData(i)).startswith(f"{index}|")),
                                      combo.currentIndex)
            combo.blockSignals(wasBlocked)
        p = self._parameterNode
        if p is not None and changed:
            p.uncertaintyVolume = result.uncertaintyNode
            p.resultSegmentation = result.segmentationNode
        if result.hasUncertainty:
            low, top = self.logic.uncertaintyRange(result)
            self.ui.uncertaintyThresholdSlider.maximum = max(top, nodes.DEFAULT_THRESHOLD)
            self.ui.uncertaintyInfoLabel.text = _("Colours: {units}; transparent below the threshold. The map's "
                                                  "maximum is {top:.3f}.").format(units=nodes.UNCERTAINTY_UNITS, top=top)
        else:
            self.ui.uncertaintyInfoLabel.text = self.oneSampleNote(result).strip()
        if showOverlay or changed:
            self.applyOverlay()
        self.updateGUIState()

    def onJumpOrganChanged(self, index: int = -1) -> None:
        data = self.ui.jumpOrganComboBox.currentData
        if data:
            self.selectResult(int(str(data).split("|", 1)[0]))

    def onResultRowDoubleClicked(self, row: int, column: int) -> None:
        self.ui.jumpOrganComboBox.currentIndex = row
        self.onJumpToUncertain()

    def onJumpToUncertain(self) -> None:
        data = self.ui.jumpOrganComboBox.currentData
        if not data:
            return
        index, organ = str(data).split("|", 1)
        self.selectResult(int(index))
        if self._lastResult is None:
            return
        ras, why = self.logic.jumpToReviewSlice(self._lastResult, organ)
        if ras is None:
            slicer.util.showStatusMessage(_("The samples agree everywhere for this organ: no uncertain slice."), 5000)
        elif why == "missed":
            slicer.util.showStatusMessage(_("{organ} probably continues here but was not segmented: review and "
                                            "paint it if so.").format(organ=organ), 8000)

    def applyOverlay(self) -> None:
        """Show the current result's overlay with the panel's settings (read from the widgets: this may run
        before the parameter node has taken a new value). A one-sample result shows none."""
        result = self._lastResult
        if result is None:
            return
        visible = bool(self.ui.showUncertaintyCheckBox.checked) and result.hasUncertainty
        self.logic.showUncertainty(result, visible, float(self.ui.uncertaintyOpacitySlider.value),
                                   threshold=float(self.ui.uncertaintyThresholdSlider.value),
                                   nearSegmentsOnly=bool(self.ui.uncertaintyInSegmentsCheckBox.checked),
                                   legend=bool(self.ui.uncertaintyLegendCheckBox.checked))

    def onOverlaySettingsChanged(self, *args) -> None:
        self.applyOverlay()

    # -- export --------------------------------------------------------------------------------------------
    def onExportDicomSeg(self) -> None:
        result = self._lastResult
        if result is None:
            return
        try:
            with slicer.util.WaitCursor():
                report = self.logic.exportDicomSeg(result)
        except dicomexport.NotFromDicomError as exc:
            logging.info("MedDiffSeg: no DICOM-SEG: %s", exc)
            if slicer.util.confirmOkCancelDisplay(str(exc) + "\n\n" + _("Export .seg.nrrd and NIfTI files instead?")):
                self.onExportFiles()
            return
        except Exception as exc:
            self.showExportError(_("The DICOM-SEG export failed"), exc)
            return
        self.ui.statusLabel.text = report.message()
        slicer.util.showStatusMessage(_("DICOM-SEG exported and added to the DICOM database."), 5000)

    def onExportFiles(self) -> None:
        result = self._lastResult
        if result is None:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                     _("Folder for the .seg.nrrd and NIfTI files"))
        if not folder:
            return
        try:
            with slicer.util.WaitCursor():
                report = self.logic.exportSegmentationFiles(result, folder)
        except Exception as exc:
            self.showExportError(_("The export failed"), exc)
            return
        self.ui.statusLabel.text = report.message()
        slicer.util.showStatusMessage(_("Exported to {folder}").format(folder=folder), 5000)

    @staticmethod
    def showExportError(title: str, exc: Exception) -> None:
        """The error's own text for the user (the library's messages are written for people), details in the log."""
        details = traceback.format_exc()
        logging.error("MedDiffSeg: %s: %s\n%s", title, exc, details)
        slicer.util.errorDisplay(f"{title}: {exc}\n\n" + _("Nothing was written."), detailedText=details)

    def onColorMapChanged(self, *args) -> None:
        p = self._parameterNode
        colorMap = self.ui.colorMapComboBox.currentText
        if p is None or not p.uncertaintyVolume or colorMap not in nodes.COLOR_MAPS:
            return
        nodes.setUncertaintyDisplay(p.uncertaintyVolume, colorMap)
        masked = p.uncertaintyVolume.GetNodeReference(nodes.SEGMENTS_OVERLAY_REFERENCE)
        if masked is not None:
            nodes.setUncertaintyDisplay(masked, colorMap, top=nodes.uncertaintyRange(p.uncertaintyVolume)[1])

    # -- refine mode (issue 22) -------------------------------------------------------------------------
    # After Segment: points and boxes placed per organ correct the result through a persistent worker
    # process (MedDiffSegLogicLib.refine / .refineworker); undo and redo, locks, suggested clicks.

    def setupRefine(self) -> None:
        self._refineTimer = qt.QTimer()
        self._refineTimer.setInterval(REFINE_POLL_INTERVAL_MS)
        self._refineTimer.connect("timeout()", self.onRefineTimer)
        self.ui.refineStartButton.connect("clicked(bool)", self.onRefineStartButton)
        self.ui.refineOrganComboBox.connect("currentIndexChanged(int)", self.onRefineOrganChanged)
        self.ui.refinePositiveButton.connect("clicked(bool)", lambda checked: self.onRefineTool("positive", checked))
        self.ui.refineNegativeButton.connect("clicked(bool)", lambda checked: self.onRefineTool("negative", checked))
        self.ui.refineBoxButton.connect("clicked(bool)", lambda checked: self.onRefineTool("box", checked))
        self.ui.refineUndoButton.connect("clicked(bool)", self.onRefineUndo)
        self.ui.refineRedoButton.connect("clicked(bool)", self.onRefineRedo)
        self.ui.refineCancelButton.connect("clicked(bool)", self.onRefineCancel)
        self.ui.refineLockListWidget.connect("itemChanged(QListWidgetItem*)", self.onRefineLockChanged)
        self.ui.refineSuggestionsCheckBox.connect("toggled(bool)", self.onRefineSuggestionsToggled)
        self.ui.refineJumpSuggestionButton.connect("clicked(bool)", self.onRefineJumpToSuggestion)
        self._refineSuggestionIndex = 0
        self._updatingRefineLocks = False

    def refineAvailability(self) -> tuple[bool, str]:
        """Whether the current result can be refined, and why not (asked once per result: it reads model.json)."""
        result = self._lastResult
        cached = getattr(self, "_refineAvailabilityOf", None)
        if cached is not None and cached[0] is result:
            return cached[1]
        try:
            answer = self.logic.refineAvailability(result)
        except Exception as exc:
            logging.warning("MedDiffSeg: cannot tell whether the result can be refined: %s", exc)
            answer = (False, str(exc))
        self._refineAvailabilityOf = (result, answer)
        return answer

    def updateRefineState(self) -> None:
        """Enable the Refine section from the state: a result whose model can refine, Refine mode on or off,
        a correction running, what can be undone."""
        if not hasattr(self.ui, "refineStartButton"):
            return
        refine = self._refine
        active = refine is not None
        segmenting = self._job is not None
        if active:
            self.ui.refineStartButton.enabled = True
            self.ui.refineStartButton.text = _("Stop refining")
        else:
            possible, why = self.refineAvailability() if self._lastResult is not None else (False, "")
            self.ui.refineStartButton.enabled = possible and not segmenting
            self.ui.refineStartButton.text = _("Start refining")
            self.ui.refineInfoLabel.text = (why if not possible and why else
                                            _("Segment a volume first: then correct what the model got wrong with "
                                              "points and boxes.") if self._lastResult is None else
                                            _("Start refining, choose the organ, then place + points where it was "
                                              "missed, - points where it overflows, or a box around it."))
        ready = active and refine.state in ("starting", "ready")
        tool = refine.placingTool() if ready else None
        for kind, button in (("positive", self.ui.refinePositiveButton), ("negative", self.ui.refineNegativeButton),
                             ("box", self.ui.refineBoxButton)):
            button.enabled = ready
            wasBlocked = button.blockSignals(True)
            button.checked = tool is not None and tool[1] == kind
            button.blockSignals(wasBlocked)
        self.ui.refineOrganComboBox.enabled = ready
        self.ui.refineLockListWidget.enabled = ready
        self.ui.refineUndoButton.enabled = ready and refine.canUndo
        self.ui.refineRedoButton.enabled = ready and refine.canRedo
        self.ui.refineCancelButton.enabled = ready and refine.busy
        self.ui.refineJumpSuggestionButton.enabled = ready and bool(refine.suggestions)
        for shortcut in self._refineShortcuts:
            shortcut.setEnabled(ready)

    def onRefineStartButton(self) -> None:
        if self._refine is not None:
            self.stopRefine(wait=False)
            self.ui.refineStatusLabel.text = _("Refine mode ended; the corrections are kept in the segmentation.")
            return
        self.startRefine()

    def startRefine(self) -> None:
        """Enter Refine mode on the current result: a worker process keeps the model and the volume."""
        result = self._lastResult
        if result is None:
            return
        possible, why = self.refineAvailability()
        if not possible:
            self.ui.refineInfoLabel.text = why
            slicer.util.warningDisplay(why)
            return
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        try:
            self._refine = self.logic.startRefine(
                result, device=presets.deviceName(p.device) if p is not None else "auto",
                notify=self.onRefineMessage, schedule=lambda f: qt.QTimer.singleShot(0, f))
        except Exception as exc:
            logging.exception("MedDiffSeg: could not start Refine mode")
            self._refine = None
            self.ui.refineStatusLabel.text = _("Could not start refining: {error}").format(error=exc)
            slicer.util.errorDisplay(_("Could not start refining: {error}").format(error=exc))
            self.updateRefineState()
            return
        self.fillRefineOrgans()
        self.createRefineShortcuts()
        self.ui.refineStatusLabel.text = _("Preparing: loading the model and the volume in a background process...")
        self._refineTimer.start()
        self.updateRefineState()

    def stopRefine(self, wait: bool = False) -> None:
        """Leave Refine mode (the worker is stopped in the background unless ``wait``); corrections stay."""
        refine = self._refine
        if refine is None:
            return
        self._refine = None
        if self._refineTimer is not None:
            self._refineTimer.stop()
        for shortcut in self._refineShortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
        self._refineShortcuts = []
        try:
            refine.stop(wait=wait)
        except Exception:
            logging.exception("MedDiffSeg: stopping Refine mode failed")
        self._refineStopping = [r for r in self._refineStopping if not r.waitStopped(0)] + [refine]
        self.updateRefineState()

    def createRefineShortcuts(self) -> None:
        """Ctrl+Z undoes the last correction, Ctrl+Y and Ctrl+Shift+Z redo it (while in Refine mode only)."""
        window = slicer.util.mainWindow()
        if window is None:  # no main window (scripts): no shortcuts, the buttons remain
            return
        for keys, slot in (("Ctrl+Z", self.onRefineUndo), ("Ctrl+Y", self.onRefineRedo),
                           ("Ctrl+Shift+Z", self.onRefineRedo)):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), window)
            shortcut.connect("activated()", slot)
            self._refineShortcuts.append(shortcut)

    def fillRefineOrgans(self) -> None:
        refine = self._refine
        combo = self.ui.refineOrganComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for organ in refine.organs:
            combo.addItem(refine.displayNames[organ], organ)
        combo.currentIndex = 0 if refine.organs else -1
        combo.blockSignals(wasBlocked)
        widget = self.ui.refineLockListWidget
        self._updatingRefineLocks = True
        widget.clear()
        for organ in refine.organs:
            item = qt.QListWidgetItem(refine.displayNames[organ])
            item.setData(qt.Qt.UserRole, organ)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if organ in refine.locked else qt.Qt.Unchecked)
            widget.addItem(item)
        self._updatingRefineLocks = False

    def onRefineTimer(self) -> None:
        refine = self._refine
        if refine is None:
            self._refineTimer.stop()
            return
        try:
            events = refine.poll()
        except Exception as exc:
            logging.exception("MedDiffSeg: polling the refine worker failed")
            events = []
            self.onRefineMessage(str(exc))
        if any(e["type"] == "reply" and e.get("ok") and e.get("update") for e in events):
            self.fillResultsTable()
            self.applyOverlay()
        if refine.state == "failed":
            worker = refine.worker
            logging.error("MedDiffSeg: the refine worker failed: %s\n%s\n%s", worker.errorMessage, worker.errorDetails,
                          "\n".join(worker.logLines[-50:]))
            message = _("Refine mode ended: {message}").format(message=worker.errorMessage)
            self.stopRefine(wait=False)
            self.onRefineMessage(message)
            slicer.util.errorDisplay(message, detailedText=worker.errorDetails or None)
            return
        if refine.busy or refine.state == "starting":
            self.ui.refineInfoLabel.text = refine.progressText()
        elif refine.state == "ready":
            self.ui.refineInfoLabel.text = refine.progressText()
        self.updateRefineState()

    def onRefineMessage(self, text: str) -> None:
        self.ui.refineStatusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    def currentRefineOrgan(self) -> str | None:
        data = self.ui.refineOrganComboBox.currentData
        return str(data) if data else None

    def onRefineOrganChanged(self, index: int = -1) -> None:
        organ = self.currentRefineOrgan()
        if self._refine is None or organ is None:
            return
        self._refine.setCurrentOrgan(organ)
        tool = self._refine.placingTool()
        if tool is not None and tool[0] != organ:  # keep placing, now for the organ chosen
            self.onRefineTool(tool[1], True)

    def onRefineTool(self, kind: str, checked: bool = True) -> None:
        """Place mode for the current organ's + points, - points or a box (the button again: stop placing)."""
        refine = self._refine
        organ = self.currentRefineOrgan()
        if refine is None or organ is None:
            return
        if not checked:
            from MedDiffSegLogicLib.refine import stopPlaceMode

            stopPlaceMode(slicer.mrmlScene)
        elif organ in refine.locked:
            self.onRefineMessage(_("{organ} is locked: unlock it to correct it.").format(
                organ=refine.displayNames[organ]))
        elif kind == "box":
            refine.placeBox(organ)
        else:
            refine.placePoints(organ, kind == "positive")
        self.updateRefineState()

    def onRefineUndo(self) -> None:
        if self._refine is not None:
            self._refine.undo()
            self.updateRefineState()

    def onRefineRedo(self) -> None:
        if self._refine is not None:
            self._refine.redo()
            self.updateRefineState()

    def onRefineCancel(self) -> None:
        if self._refine is not None:
            self._refine.cancel()

    def onRefineLockChanged(self, item=None) -> None:
        if self._updatingRefineLocks or self._refine is None or item is None:
            return
        organ = item.data(qt.Qt.UserRole)
        locked = item.checkState() == qt.Qt.Checked
        self._refine.setLocked(organ, locked)
        self.onRefineMessage((_("{organ} is locked: corrections leave it as it is.") if locked else
                              _("{organ} can be corrected again.")).format(organ=self._refine.displayNames[organ]))

    def onRefineSuggestionsToggled(self, checked: bool = True) -> None:
        refine = self._refine
        if refine is None:
            return
        refine.suggestionCount = 3 if checked else 0
        node = refine.suggestionsNode()
        if node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility(bool(checked))
        if checked:
            refine.requestSuggestions()

    def onRefineJumpToSuggestion(self) -> None:
        refine = self._refine
        if refine is None or not refine.suggestions:
            return
        self._refineSuggestionIndex %= len(refine.suggestions)
        ras = refine.suggestionRas(self._refineSuggestionIndex)
        if ras is not None:
            nodes.jumpSlices(slicer.mrmlScene, ras)
            self.onRefineMessage(_("Suggestion {n}/{total}: {label}").format(
                n=self._refineSuggestionIndex + 1, total=len(refine.suggestions),
                label=refine.suggestionLabel(refine.suggestionsOrgan, refine.suggestions[self._refineSuggestionIndex])))
        self._refineSuggestionIndex += 1



#
# MedDiffSegLogic
#


class MedDiffSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation of volume nodes with MedDiffSegLib; usable without the GUI (scripts, tests).

    Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("MedDiffSeg")  # or MedDiffSeg.MedDiffSegLogic()
        result = logic.segment(getNode("CTChest"), ["liver", "spleen"], samples=5, seed=0)
        result.segmentationNode, result.uncertaintyNode, result.organs
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        dependencies.ensureLibraryOnPath(MODULE_DIR)

    def getParameterNode(self) -> MedDiffSegParameterNode:
        return MedDiffSegParameterNode(super().getParameterNode())

    # -- dependencies ---------------------------------------------------------------------------------
    def dependencyPlan(self) -> "dependencies.DependencyPlan":
        """What the first Segment would install (read from package metadata: nothing is imported)."""
        return dependencies.planDependencies(MODULE_DIR)

    def ensureDependencies(self, confirm=None) -> "dependencies.DependencyResult":
        """Install PyTorch (through the PyTorch extension, at least the minimum version) and the library's other
        packages (keeping Slicer's own numpy, SimpleITK and pydicom), after ``confirm(question)``."""
        return dependencies.ensureDependencies(MODULE_DIR, confirm=confirm, workDir=self.temporaryFolder())

    # -- models ---------------------------------------------------------------------------------------
    def listModels(self) -> list:
        """The installed model packages (``PackageInfo``: read from their model.json, no torch)."""
        from MedDiffSegLib.registry import list_package_infos

        return list_package_infos()

    def defaultModelName(self, modality: str = "CT", packages=None) -> str:
        """The model used for a ``modality`` volume when none is chosen ("" when none is installed)."""
        return modalityLib.defaultModelName(self.listModels() if packages is None else packages, modality)

    def modelModality(self, package) -> str:
        """"CT" or "MR": what a package (or its folder) is made for, read from its model.json."""
        return modalityLib.packageModality(package)

    def volumeModality(self, volumeNode, database=None) -> "modalityLib.VolumeModality":
        """CT or MR for ``volumeNode``: the Modality tag of the DICOM series it was loaded from (through the
        DICOM database), else whether its voxels are plausible as Hounsfield units."""
        if database is None and dicomexport.instanceUIDs(volumeNode):
            database = self.dicomDatabase()
        return modalityLib.volumeModality(volumeNode, database)

    def modelsForVolume(self, volumeNode, packages=None, database=None) -> tuple:
        """(the volume's modality, the packages made for it, the other packages); the modality is None
        (and every package fits) when there is no volume."""
        packages = self.listModels() if packages is None else list(packages)
        volume = self.volumeModality(volumeNode, database) if volumeNode is not None else None
        fitting, others = modalityLib.splitByModality(packages, volume.modality if volume else None)
        return volume, fitting, others

    def modalityWarning(self, volumeNode, model, volume=None) -> str:
        """A sentence for the user when ``model`` is not made for ``volumeNode``'s modality ("" when it is)."""
        if volumeNode is None or not model:
            return ""
        package = self.modelPackage(model) if isinstance(model, str) else model
        volume = volume if volume is not None else self.volumeModality(volumeNode)
        return modalityLib.mismatchWarning(package.name, self.modelModality(package), volume)

    def modelPackage(self, model=None):
        """The package ``model`` names (installed name, folder, or a package object; None: the CT default),
        as a torch-free ``PackageInfo``."""
        from MedDiffSegLib.registry import package_info, read_package_info
        from MedDiffSegLogicLib.segmentation import isPackage

        if isPackage(model):
            return model if hasattr(model, "load") else read_package_info(model.path)
        return package_info(model or None)

    def modelDescription(self, package) -> str:
        text = f"{package.description or package.name} - method {package.method_name}, version {package.version}"
        scores = presets.scoreSummary(package.metrics)
        return f"{text}; {scores}" if scores else text

    def installModel(self, source: str, sha256: str | None = None, force: bool = False, progress=None):
        """Install a model package from a zip or an http(s) URL (the archive, its paths, its sha256 - required
        for a URL - and the weights' hash are checked); returns its ``PackageInfo``. Runs here, without torch."""
        from MedDiffSegLib.registry import install_package

        return install_package(source, sha256=sha256, force=force, progress=progress, full_check=False)

    def startModelInstall(self, source: str, sha256: str | None = None, update: str | None = None,
                          force: bool = False, catalogue: str | None = None) -> "modelsLib.ModelInstallJob":
        """Install (or, with ``update=name``, update) a package in a background thread; with ``catalogue=name``
        download and install that package of the model catalogue. Poll the job."""
        return modelsLib.ModelInstallJob(source, sha256, force=force, update=update, catalogue=catalogue).start()

    def updateModel(self, name: str, source: str, sha256: str | None = None, allowDowngrade: bool = False):
        """Replace installed model ``name`` by a newer version of it (zip or URL); returns (before, after)."""
        from MedDiffSegLib.registry import update_package

        return update_package(name, source, sha256=sha256, allow_downgrade=allowDowngrade, full_check=False)

    def removeModel(self, name: str):
        """Delete a user-installed model package (built-in ones cannot be removed); returns its folder."""
        from MedDiffSegLib.registry import remove_package

        return remove_package(name)

    # -- device ---------------------------------------------------------------------------------------
    _deviceCache: dict = {}

    def deviceInfo(self, device: str = "auto") -> tuple[str, bool]:
        """(description, is a GPU) of the device a run would use, asked of a worker process (torch and CUDA are
        never initialised in Slicer's process); remembered for the session. Raises ``DeviceProbeError`` with
        the worker's message when a GPU is asked for but absent."""
        name = presets.deviceName(device) if device in presets.DEVICES else device
        if name not in self._deviceCache:
            libraryRoot = dependencies.libraryRoot(MODULE_DIR)
            self._deviceCache[name] = probeDevice(name, pythonPath=[str(libraryRoot)] if libraryRoot else [])
        info = self._deviceCache[name]
        return info["device"], bool(info["gpu"])

    def estimateSeconds(self, volumeNode, options: SegmentOptions) -> float:
        """A rough CPU time for segmenting ``volumeNode`` (the progress bar refines it once running)."""
        from MedDiffSegLogicLib.geometry import directionsRAS

        package = options.resolvePackageInfo()
        dims = volumeNode.GetImageData().GetDimensions()
        superior = abs(directionsRAS(volumeNode)[2, :])
        samples = options.samples or int(package.inference.get("samples", 1))
        return presets.estimateCpuSeconds(dims, volumeNode.GetSpacing(), package, len(options.organs), samples,
                                          options.steps, sliceAxis=int(superior.argmax()))

    # -- segmentation ------------------------------------------------------------------------------------
    def segment(self, volumeNode, organs, samples: int | None = None, seed: int = 0, model=None, device: str = "auto",
                steps: int | None = None, staple: bool = False, largestComponent: bool = False,
                scheduler: str | None = None, segmentationNode=None, colorMap: str = nodes.DEFAULT_COLOR_MAP,
                progress=None, shouldCancel=None, allowModalityMismatch: bool = False,
                database=None) -> MedDiffSegResult:
        """Segment ``organs`` in ``volumeNode`` in this process and add the result to the scene.

        Returns a :class:`MedDiffSegResult` with ``.segmentationNode`` (one segment per organ, named
        by its display name, with its colour and SNOMED CT terminology, on the volume's exact grid)
        and ``.uncertaintyNode`` (the samples' variance, the volume's IJK→RAS, a colour map).
        ``model``: installed name, package folder, ModelPackage or None (the default model for the
        volume's modality: its DICOM Modality tag, else CT when its voxels are plausible Hounsfield
        units and MR when not). A model made for another modality than the volume's raises
        ``ModalityMismatchError`` unless ``allowModalityMismatch``. ``database``: where a DICOM
        volume's files are found (default: Slicer's DICOM database).
        ``progress(stage, fraction, message)`` and ``shouldCancel()`` are passed to the engine; a
        cancelled or failed run raises and leaves the scene as it was.
        """
        options = SegmentOptions(organs=[organs] if isinstance(organs, str) else list(organs), model=model,
                                 samples=samples, steps=steps, seed=seed, device=presets.deviceName(device),
                                 scheduler=scheduler, staple=staple, largestComponent=largestComponent,
                                 allowModalityMismatch=bool(allowModalityMismatch))
        return segmentInProcess(volumeNode, options, segmentationNode=segmentationNode, colorMap=colorMap,
                                progress=progress, shouldCancel=shouldCancel, database=database)

    def segmentBatch(self, volumeNodes, organs, **kwargs) -> list[MedDiffSegResult]:
        """:meth:`segment` for each volume in turn (same settings, a new segmentation node each)."""
        kwargs.pop("segmentationNode", None)
        return [self.segment(volumeNode, organs, **kwargs) for volumeNode in volumeNodes]

    def startBackgroundSegmentation(self, volumeNode, options: SegmentOptions, segmentationNode=None,
                                    colorMap: str = nodes.DEFAULT_COLOR_MAP, runner=None,
                                    tempRoot: str | None = None) -> BackgroundSegmentation:
        """Start a worker process for ``volumeNode``; poll the returned job until ``finished``."""
        libraryRoot = dependencies.libraryRoot(MODULE_DIR)
        job = BackgroundSegmentation(volumeNode, options, segmentationNode=segmentationNode, colorMap=colorMap,
                                     runner=runner, pythonPath=[str(libraryRoot)] if libraryRoot else [],
                                     tempRoot=tempRoot)
        job.start()
        return job

    # -- review ---------------------------------------------------------------------------------------------
    def showUncertainty(self, result: MedDiffSegResult, visible: bool = True, opacity: float = 0.5,
                        threshold: float | None = None, nearSegmentsOnly: bool = False, legend: bool = True):
        """Show (or hide) the uncertainty map over the input volume in every slice view: transparent below
        ``threshold`` (in the map's units), with a colour legend, over the whole image or only near the
        segments. A one-sample result has no uncertainty: nothing is shown. Returns the node shown."""
        scene = result.volumeNode.GetScene()
        return nodes.showUncertaintyOverlay(scene, result.volumeNode, result.uncertaintyNode,
                                            visible=visible and result.hasUncertainty, opacity=opacity,
                                            threshold=threshold, legend=legend,
                                            nearSegmentsOf=result.segmentationNode if nearSegmentsOnly else None)

    @staticmethod
    def uncertaintyRange(result: MedDiffSegResult) -> tuple[float, float]:
        return nodes.uncertaintyRange(result.uncertaintyNode)

    @staticmethod
    def resultFromNodes(segmentationNode) -> MedDiffSegResult | None:
        """A result rebuilt from the nodes a (re)loaded scene holds; None when they are not a MedDiffSeg result."""
        return resultFromNodes(segmentationNode)

    def jumpToMostUncertainSlice(self, result: MedDiffSegResult, organ: str):
        """Move the slice views to ``organ``'s most uncertain slice; returns its RAS point (None: none)."""
        ras = result.mostUncertainRAS(organ)
        if ras is not None:
            nodes.jumpSlices(result.volumeNode.GetScene(), ras)
        return ras

    def jumpToReviewSlice(self, result: MedDiffSegResult, organ: str):
        """Move the slice views to where ``organ`` needs review first: a slice where it probably continues
        unsegmented, else its most uncertain slice. Returns ``(RAS point or None, "missed" | "uncertain" | "")``."""
        ras, why = result.reviewTarget(organ)
        if ras is not None:
            nodes.jumpSlices(result.volumeNode.GetScene(), ras)
        return ras, why


    # -- refine (issue 22) ---------------------------------------------------------------------------------
    def refineAvailability(self, result) -> tuple[bool, str]:
        """(True, "") when ``result`` can be refined with clicks (its model was trained with prompt channels,
        read from its model.json: no torch), else (False, the explanation for the user)."""
        from MedDiffSegLogicLib.refine import resultRefineAvailability

        return resultRefineAvailability(result)

    def startRefine(self, result, device: str = "auto", samples: int | None = None, seed: int | None = None,
                    notify=None, schedule=None, workerOptions: dict | None = None):
        """Refine mode on ``result``: a persistent worker process holds the model, the volume and its encodings
        between clicks. Returns the started :class:`~MedDiffSegLogicLib.refine.RefineController`; poll it until
        its ``state`` is ``ready``, place points with ``placePoints``/``placeBox`` (or add control points to its
        Markups nodes), ``undo``/``redo``, ``setLocked``; ``stop()`` at the end. Raises ``ValueError`` when the
        result's model cannot refine."""
        from MedDiffSegLogicLib.refine import RefineController

        libraryRoot = dependencies.libraryRoot(MODULE_DIR)
        options = {"pythonPath": [str(libraryRoot)] if libraryRoot else [], "tempRoot": self.temporaryFolder()}
        options.update(workerOptions or {})
        controller = RefineController(result, device=presets.deviceName(device),
                                      samples=samples, seed=seed, workerOptions=options, schedule=schedule,
                                      notify=notify)
        controller.start()
        return controller

    # -- export ---------------------------------------------------------------------------------------------
    def dicomDatabase(self):
        """Slicer's DICOM database behind the :class:`~MedDiffSegLogicLib.dicomexport.DicomDatabase` protocol
        (None when the application has none open)."""
        return dicomexport.SlicerDicomDatabase.fromApplication()

    def canExportDicomSeg(self, volumeNode, database=None) -> tuple[bool, str]:
        """(True, "") when ``volumeNode`` came from the DICOM database, else (False, the explanation)."""
        database = database if database is not None else self.dicomDatabase()
        return dicomexport.dicomExportAvailability(volumeNode, database)

    def exportDicomSeg(self, result, outputFolder: str | None = None, *, database=None, volumeNode=None,
                       uncertaintyNode=None, includeUncertainty: bool = True, model=None,
                       seriesDescription: str | None = None, allowEmpty: bool = False, addToDatabase: bool = True,
                       overwrite: bool = False) -> dicomexport.ExportReport:
        """Export ``result`` (a MedDiffSegResult or a segmentation node) as a DICOM-SEG, with the uncertainty
        as a DICOM Parametric Map, and add both to the DICOM database.

        The source series is found from the volume's ``DICOM.instanceUIDs`` through ``database``
        (default: Slicer's). Organ names, colours and SNOMED CT codes come from the model package
        of the run (``model`` overrides). The files go to ``outputFolder`` (``segmentation.dcm``,
        ``uncertainty_pmap.dcm``), by default a new folder under Slicer's temporary folder.

        When the volume is not from DICOM: with ``outputFolder``, ``.seg.nrrd`` + NIfTI files are
        written there instead and the report's ``explanation`` says why; without one,
        :class:`~MedDiffSegLogicLib.dicomexport.NotFromDicomError` carries the explanation. Any error
        leaves nothing of the export behind.
        """
        return dicomexport.exportResult(
            result, database if database is not None else self.dicomDatabase(), outputFolder, volumeNode=volumeNode,
            uncertaintyNode=uncertaintyNode, includeUncertainty=includeUncertainty, model=model,
            seriesDescription=seriesDescription, allowEmpty=allowEmpty, addToDatabase=addToDatabase,
            overwrite=overwrite, tempRoot=self.temporaryFolder())

    def exportSegmentationFiles(self, result, outputFolder: str, *, volumeNode=None, uncertaintyNode=None,
                                includeUncertainty: bool = True, overwrite: bool = False) -> dicomexport.ExportReport:
        """Write ``NAME.seg.nrrd``, ``NAME_labels.nii.gz`` and ``NAME_uncertainty.nii.gz`` into ``outputFolder``
        (through storage nodes; all or nothing)."""
        segmentationNode, volumeNode, uncertaintyNode = dicomexport.resultNodes(result, volumeNode, uncertaintyNode,
                                                                                includeUncertainty)
        return dicomexport.exportFiles(segmentationNode, volumeNode, outputFolder, uncertaintyNode=uncertaintyNode,
                                       overwrite=overwrite)

    @staticmethod
    def temporaryFolder() -> str | None:
        app = getattr(slicer, "app", None)
        path = getattr(app, "temporaryPath", None) if app is not None else None
        return str(path) if path and os.path.isdir(str(path)) else None


#
# MedDiffSegTest
#


class MedDiffSegTest(ScriptedLoadableModuleTest):
    """Self-test (Slicer's "Reload and Test"): a tiny random-weight model on a synthetic volume.

    It needs PyTorch and the library's packages. When they are missing it installs them (after the same
    one question the panel asks) - except in Slicer's testing mode (ctest), where nothing may change
    Slicer's Python: it is then skipped, with the reason (``unittest.SkipTest`` under unittest; a
    message in "Reload and Test").
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def dependenciesMissing(self) -> str:
        """Why the self-test cannot run ("" when it can), after installing what is missing when allowed."""
        logic = MedDiffSegLogic()
        plan = logic.dependencyPlan()
        if plan.satisfied:
            return ""
        app = getattr(slicer, "app", None)
        testing = bool(app is not None and getattr(app, "testingEnabled", lambda: False)())
        if testing:
            return plan.reason() + " (Slicer's testing mode installs nothing)"
        result = logic.ensureDependencies(confirm=lambda question: slicer.util.confirmOkCancelDisplay(question))
        return "" if result else result.message

    def runTest(self) -> None:
        self.setUp()
        reason = self.dependenciesMissing()
        if reason:
            logging.warning("MedDiffSeg self-test skipped: %s", reason)
            self.delayDisplay(f"MedDiffSeg self-test skipped: {reason}")
            return
        self.test_SegmentSyntheticVolume()

    @staticmethod
    def makeTinyPackage(folder: str):
        """A random-weight package with the library's tiny test configuration (fast on any CPU)."""
        import torch

        from MedDiffSegLib.methods.base import _METHODS, _import_builtin_methods, build_method
        from MedDiffSegLib.preprocessing import PreprocessSpec
        from MedDiffSegLib.registry import Organ, save_package

        _import_builtin_methods()
        sct = "SCT"
        anatomy = {"code": "123037004", "scheme": sct, "meaning": "Anatomical Structure"}
        organs = [Organ("liver", "Liver", (221, 130, 101), anatomy, {"code": "10200004", "scheme": sct, "meaning": "Liver"}),
                  Organ("spleen", "Spleen", (157, 108, 162), anatomy, {"code": "78961009", "scheme": sct, "meaning": "Spleen"})]
        torch.manual_seed(0)
        method = build_method("guided", _METHODS["guided"].tiny_config(len(organs)))
        return save_package(os.path.join(folder, "tiny-guided"), method, name="tiny-guided", version="0.0.1",
                            organs=organs, preprocessing=PreprocessSpec(modality="CT", spacing=(8.0, 8.0)),
                            inference={"roi_size": [32, 32], "overlap": 0.25, "steps": 1, "samples": 2,
                                       "sw_batch_size": 16},
                            description="self-test model (random weights)")

    def test_SegmentSyntheticVolume(self) -> None:
        import tempfile

        import numpy as np

        reason = self.dependenciesMissing()
        if reason:
            self.skipTest(reason)

        self.delayDisplay("Starting the MedDiffSeg self-test")
        z, y, x = np.mgrid[0:8, 0:48, 0:40]
        array = np.where(((x - 20) / 14.0) ** 2 + ((y - 24) / 16.0) ** 2 < 1, 60, -1000).astype(np.int16)
        volumeNode = slicer.util.addVolumeFromArray(array, name="MedDiffSegSelfTest")
        volumeNode.SetSpacing(2.0, 2.5, 5.0)
        volumeNode.SetOrigin(-30.0, 12.0, 100.0)
        volumeNode.SetIJKToRASDirections([[-1, 0, 0], [0, -1, 0], [0, 0, 1]])
        with tempfile.TemporaryDirectory() as folder:
            package = self.makeTinyPackage(folder)
            logic = MedDiffSegLogic()
            before = slicer.mrmlScene.GetNumberOfNodes()
            result = logic.segment(volumeNode, ["liver", "spleen"], samples=2, seed=1, model=package, device="cpu")
        segmentation = result.segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 2)
        self.assertEqual(segmentation.GetSegment("liver").GetName(), "Liver")
        self.assertIn("10200004", segmentation.GetSegment("liver").GetTerminology())
        uncertainty = slicer.util.arrayFromVolume(result.uncertaintyNode)
        self.assertEqual(uncertainty.shape, array.shape)
        m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m1)
        result.uncertaintyNode.GetIJKToRASMatrix(m2)
        self.assertTrue(all(m1.GetElement(r, c) == m2.GetElement(r, c) for r in range(4) for c in range(4)))
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("MedDiffSeg self-test passed")
