"""The uncertainty overlay a radiologist reads: what Slicer's own slice pipeline draws, and what the scene keeps.

The slice views are rendered with ``vtkMRMLSliceLogic`` (the pipeline behind Slicer's slice views: the
background and foreground layers blended with the display nodes' colour maps, windows, thresholds and
opacity), so "transparent below the threshold" is checked on the pixels a user sees. Results are made
with ``buildResultNodes`` from known arrays (no model needed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import slicer_harness
from slicer_harness import GuiSession
from vtk.util import numpy_support

from MedDiffSegLogicLib import nodes
from MedDiffSegLogicLib.segmentation import buildResultNodes, resultFromNodes

SHAPE = (3, 40, 48)  # K, J, I
ORGANS = [
    {"name": "liver", "display_name": "Liver", "color": [221, 130, 101],
     "category": {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
     "type": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"}},
]
BLOCK = (slice(None), slice(10, 30), slice(10, 24))
FAR_SPOT = (slice(None), slice(5, 9), slice(38, 44))  # uncertain, but far from the segment


def make_result(slicer, mrml, samples: int = 5, name: str = "patient", continuation=None):
    array = np.full(SHAPE, -100, np.int16)
    array[:, :, 24:] = 100
    volume = slicer.util.addVolumeFromArray(array, name=name)
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevelMinMax(-200, 200)
    labels = np.zeros(SHAPE, np.uint8)
    labels[BLOCK] = 1
    uncertainty = np.zeros(SHAPE, np.float32)
    if samples > 1:
        uncertainty[:, 9:31, 9:11] = 0.2    # the left boundary of the segment
        uncertainty[:, 9:31, 23:25] = 0.05  # its right boundary
        uncertainty[FAR_SPOT] = 0.15
    summary = {"organs": [{"name": "liver", "display_name": "Liver", "label": 1, "volume_ml": 8.4,
                           "mean_uncertainty": float(uncertainty[BLOCK].mean()),
                           "max_uncertainty_position_mm": [-10.0, -20.0, 1.0],
                           "possible_continuation": list(continuation or [])}],
               "model": {"name": "tiny-guided", "version": "0.0.1"},
               "settings": {"samples": samples, "seed": 0, "device": "cpu: test"},
               "timings_s": {"total": 1.5}}
    return buildResultNodes(volume, labels, uncertainty, ORGANS, summary)


class SliceView:
    """One slice view as Slicer draws it (vtkMRMLSliceLogic), read back as an RGBA array [row, column, 4]."""

    def __init__(self, slicer, mrml, name="Red"):
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(mrml.appLogic)
        self.logic.SetMRMLScene(mrml.scene)
        self.sliceNode = self.logic.AddSliceNode(name)
        self.composite = self.logic.GetSliceCompositeNode()

    def render(self, volume):
        self.sliceNode.SetDimensions(SHAPE[2], SHAPE[1], 1)
        self.sliceNode.SetOrientation("Axial")
        self.logic.FitSliceToAll()
        self.sliceNode.SetSliceOffset(1.0)
        self.sliceNode.Modified()
        self.composite.Modified()
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1).copy()


def pixel_mask(view, volume, mask_kji):
    """Which rendered pixels show voxels of ``mask_kji``: found by rendering the mask itself as the image."""
    import slicer

    from MedDiffSegLogicLib.geometry import copyGeometry

    scene = volume.GetScene()
    probe = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "probe")
    slicer.util.updateVolumeFromArray(probe, np.ascontiguousarray(np.broadcast_to(mask_kji, SHAPE), dtype=np.int16) * 1000)
    copyGeometry(volume, probe)
    probe.CreateDefaultDisplayNodes()
    display = probe.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 1000)
    display.SetInterpolate(False)
    saved = (view.composite.GetBackgroundVolumeID(), view.composite.GetForegroundVolumeID())
    view.composite.SetBackgroundVolumeID(probe.GetID())
    view.composite.SetForegroundVolumeID(None)
    rendered = view.render(probe)[..., 0] > 127
    view.composite.SetBackgroundVolumeID(saved[0])
    view.composite.SetForegroundVolumeID(saved[1])
    scene.RemoveNode(probe)
    return rendered


def box(region) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[region] = True
    return mask


@pytest.fixture
def view(slicer, mrml):
    return SliceView(slicer, mrml)


def test_the_overlay_is_transparent_where_the_samples_agree(slicer, mrml, module, view):
    result = make_result(slicer, mrml)
    logic = module.MedDiffSegLogic()
    view.composite.SetBackgroundVolumeID(result.volumeNode.GetID())
    plain = view.render(result.volumeNode)

    shown = logic.showUncertainty(result, True, opacity=1.0, threshold=0.01, legend=False)
    assert shown is result.uncertaintyNode
    display = shown.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.01)
    overlaid = view.render(result.volumeNode)
    uncertain = pixel_mask(view, result.volumeNode, slicer.util.arrayFromVolume(result.uncertaintyNode) > 0)
    assert uncertain.any() and (~uncertain).any()
    # where the samples agree the image is exactly as without the overlay; where they disagree it is coloured
    assert np.array_equal(overlaid[~uncertain], plain[~uncertain])
    assert (np.abs(overlaid[uncertain].astype(int) - plain[uncertain].astype(int)).sum(axis=-1) > 0).mean() > 0.9

    # a threshold above the 0.05 boundary hides it; the 0.2 boundary stays
    logic.showUncertainty(result, True, opacity=1.0, threshold=0.1, legend=False)
    weak = pixel_mask(view, result.volumeNode, slicer.util.arrayFromVolume(result.uncertaintyNode) == np.float32(0.05))
    assert np.array_equal(view.render(result.volumeNode)[weak], plain[weak])
    assert result.uncertaintyNode.GetAttribute("MedDiffSeg.Threshold") == repr(0.1)
    # hidden: the views show the image alone
    logic.showUncertainty(result, False)
    assert view.composite.GetForegroundVolumeID() is None
    assert np.array_equal(view.render(result.volumeNode), plain)


def test_the_colour_legend_names_the_units(slicer, mrml, module, view):
    result = make_result(slicer, mrml)
    logic = module.MedDiffSegLogic()
    logic.showUncertainty(result, True, threshold=0.01, legend=True)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(result.uncertaintyNode)
    assert legend is not None and legend.GetVisibility()
    assert legend.GetTitleText() == "Uncertainty\n(variance of samples)"  # short: it must fit a slice view
    assert legend.GetLabelFormat() == "%.3f"
    logic.showUncertainty(result, True, threshold=0.01, legend=False)
    assert not legend.GetVisibility()


def test_the_overlay_can_be_limited_to_the_segments(slicer, mrml, module, view):
    result = make_result(slicer, mrml)
    logic = module.MedDiffSegLogic()
    view.composite.SetBackgroundVolumeID(result.volumeNode.GetID())
    plain = view.render(result.volumeNode)
    shown = logic.showUncertainty(result, True, opacity=1.0, threshold=0.01, nearSegmentsOnly=True, legend=True)
    assert shown is not result.uncertaintyNode
    assert result.uncertaintyNode.GetNodeReference(nodes.SEGMENTS_OVERLAY_REFERENCE) is shown
    values = slicer.util.arrayFromVolume(shown)
    original = slicer.util.arrayFromVolume(result.uncertaintyNode)
    near = nodes.segmentsMask(result.segmentationNode, result.volumeNode)
    assert np.array_equal(values[near], original[near]) and not values[~near].any()
    assert not values[FAR_SPOT].any() and original[FAR_SPOT].all()
    assert values[:, 9:31, 9:11].all()  # the boundary just outside the segment is kept (margin)
    far = pixel_mask(view, result.volumeNode, box(FAR_SPOT))
    assert np.array_equal(view.render(result.volumeNode)[far], plain[far])
    assert view.composite.GetForegroundVolumeID() == shown.GetID()
    assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(shown).GetVisibility()
    # back to the whole map: the masked copy leaves the views, the original (and its legend) come back
    logic.showUncertainty(result, True, threshold=0.01, nearSegmentsOnly=False, legend=True)
    assert view.composite.GetForegroundVolumeID() == result.uncertaintyNode.GetID()
    assert not slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(shown).GetVisibility()


def test_one_sample_shows_no_overlay_and_says_why(slicer, mrml, module, monkeypatch):
    gui = GuiSession(slicer, monkeypatch)
    mrml.add_slice_views()
    result = make_result(slicer, mrml, samples=1)
    assert not result.hasUncertainty
    logic = module.MedDiffSegLogic()
    assert logic.showUncertainty(result, True, threshold=0.01) is None
    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert composites and all(c.GetForegroundVolumeID() is None for c in composites)
    widget = gui.open(module)
    try:
        widget.showResult(result)
        assert "One sample was drawn" in widget.ui.uncertaintyInfoLabel.text
        assert "cannot disagree" in widget.ui.uncertaintyInfoLabel.text
        assert not widget.ui.showUncertaintyCheckBox.enabled and not widget.ui.jumpToUncertainButton.enabled
        assert widget.ui.resultsTableWidget.rows()[0][3] == "-"  # no mean uncertainty for one sample
        assert all(c.GetForegroundVolumeID() is None for c in composites)
        assert "One sample" in widget.oneSampleNote(result)
    finally:
        gui.close()


def test_jump_goes_to_a_possibly_missed_slice_first_even_with_one_sample(slicer, mrml, module, monkeypatch):
    """One sample has no variance, but the missed-structure signal still says where to look."""
    gui = GuiSession(slicer, monkeypatch)
    mrml.add_slice_views()
    run = {"kind": "beyond_mask", "side": "superior", "slices": [3, 4], "extent_mm": 2.0, "area_mm2": [150.0, 120.0],
           "peak_slice": 3, "peak_position_mm": [-10.0, -20.0, 3.0]}
    weak = dict(run, area_mm2=[101.0], peak_position_mm=[-10.0, -20.0, 0.0])
    result = make_result(slicer, mrml, samples=1, continuation=[weak, run])
    assert not result.hasUncertainty and result.hasReviewTarget
    assert result.reviewTarget("liver") == (pytest.approx((10.0, 20.0, 3.0)), "missed")
    messages = []
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda text, ms=0: messages.append(text), raising=False)
    widget = gui.open(module)
    try:
        widget.showResult(result)
        assert widget.ui.jumpToUncertainButton.enabled
        widget.ui.jumpToUncertainButton.click()
        red = mrml.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
        assert red.GetSliceOffset() == pytest.approx(3.0)
        assert messages and "probably continues" in messages[-1]
    finally:
        gui.close()
    # Without a possible miss, a one-sample result has nowhere to jump; with samples, the most uncertain slice.
    assert not make_result(slicer, mrml, samples=1, name="b").hasReviewTarget
    assert make_result(slicer, mrml, name="c").reviewTarget("liver") == (pytest.approx((10.0, 20.0, 1.0)), "uncertain")


def test_results_overlay_and_jump_come_back_after_the_scene_is_reloaded(slicer, mrml, module, monkeypatch, tmp_path):
    gui = GuiSession(slicer, monkeypatch)
    mrml.add_slice_views()
    result = make_result(slicer, mrml)
    widget = gui.open(module)
    widget.ui.uncertaintyInSegmentsCheckBox.checked = True
    widget.showResult(result)
    widget.ui.uncertaintyThresholdSlider.value = 0.03
    p = widget._parameterNode
    assert p.resultSegmentation is result.segmentationNode and p.uncertaintyVolume is result.uncertaintyNode
    assert p.uncertaintyInSegmentsOnly and p.uncertaintyThreshold == pytest.approx(0.03)
    masked = result.uncertaintyNode.GetNodeReference(nodes.SEGMENTS_OVERLAY_REFERENCE)
    assert masked is not None
    gui.close()
    assert mrml.appLogic.SaveSceneToSlicerDataBundleDirectory(str(tmp_path), None)
    scene_file = next(f for f in os.listdir(tmp_path) if f.endswith(".mrml"))

    reloaded = slicer_harness.MRMLEnvironment(slicer).activate()  # a new session loads the saved scene
    reloaded.add_slice_views()
    reloaded.scene.SetURL(str(tmp_path / scene_file))
    assert reloaded.scene.Import()
    gui = GuiSession(slicer, monkeypatch)
    try:
        widget = gui.open(module)
        again = widget._lastResult
        assert again is not None, "the result was not found again in the reloaded scene"
        assert again.segmentationNode.GetName() == result.segmentationNode.GetName()
        assert again.volumeNode.GetName() == "patient" and again.uncertaintyNode.GetName() == result.uncertaintyNode.GetName()
        assert widget.ui.resultsTableWidget.rows() == [["patient", "Liver", "8.4",
                                                       f"{result.organs[0]['mean_uncertainty']:.4g}"]]
        # the overlay settings and nodes came back with the scene
        assert widget._parameterNode.uncertaintyThreshold == pytest.approx(0.03)
        assert widget.ui.uncertaintyInSegmentsCheckBox.checked
        again_masked = again.uncertaintyNode.GetNodeReference(nodes.SEGMENTS_OVERLAY_REFERENCE)
        assert again_masked is not None
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        assert all(c.GetForegroundVolumeID() == again_masked.GetID() for c in composites)
        assert again.uncertaintyNode.GetDisplayNode().GetApplyThreshold()
        # jump to the most uncertain slice works on the reloaded nodes
        red = reloaded.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
        widget.ui.jumpToUncertainButton.click()
        assert red.GetSliceOffset() == pytest.approx(1.0)
        assert resultFromNodes(again.segmentationNode).organs == again.organs
    finally:
        gui.close()


def test_a_batch_shows_every_volumes_results(slicer, mrml, module, monkeypatch):
    gui = GuiSession(slicer, monkeypatch)
    mrml.add_slice_views()
    first, second = make_result(slicer, mrml, name="first"), make_result(slicer, mrml, name="second")
    widget = gui.open(module)
    try:
        widget.clearResults()
        widget.showResult(first)
        widget.showResult(second)
        rows = widget.ui.resultsTableWidget.rows()
        assert [r[:2] for r in rows] == [["first", "Liver"], ["second", "Liver"]]
        assert widget.ui.resultsTableWidget.horizontalHeaderLabels()[0] == "Volume"
        jump = widget.ui.jumpOrganComboBox
        assert [t for t, _ in jump.items()] == ["first: Liver", "second: Liver"]
        assert widget._lastResult is second
        jump.activate(0)
        assert widget._lastResult is first and widget._parameterNode.uncertaintyVolume is first.uncertaintyNode
        widget.ui.resultsTableWidget.doubleClick(1)
        assert widget._lastResult is second
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        assert all(c.GetForegroundVolumeID() == second.uncertaintyNode.GetID() for c in composites)
    finally:
        gui.close()


def test_the_screenshot_script_renders_a_slice_view_offscreen(tmp_path, tiny_package):
    """Testing/slicer/render_screenshot.py (which made Resources/Screenshot01.png from a shipped model's run on
    the real CT) still renders: slice logic + displayable managers in an offscreen VTK window. Run in a child
    process (an OpenGL failure must not take the test session down); skipped where VTK cannot render offscreen."""
    import json
    import shutil
    import struct
    import subprocess
    import sys

    import SimpleITK as sitk

    results = tmp_path / "results"
    results.mkdir()
    z, y, x = np.mgrid[0:6, 0:64, 0:80]
    ct = np.where(((x - 40) / 34.0) ** 2 + ((y - 32) / 26.0) ** 2 < 1, 40, -1000).astype(np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[:, 20:40, 20:45] = 1
    uncertainty = np.zeros(ct.shape, np.float32)
    uncertainty[:, 19:41, 19:21] = 0.2
    for array, path in ((ct, tmp_path / "ct.nii.gz"), (labels, results / "segmentation.nii.gz"),
                        (uncertainty, results / "uncertainty.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.0, 3.0, 3.0))
        sitk.WriteImage(image, str(path))
    (results / "summary.json").write_text(json.dumps({
        "organs": [{"name": "liver", "display_name": "Liver", "volume_ml": 1.0, "mean_uncertainty": 0.01}],
        "model": {"name": "tiny-guided", "version": "0.0.1"}, "settings": {"samples": 5, "seed": 0}}))
    home = tmp_path / "home"
    shutil.copytree(tiny_package.path, home / "models" / "tiny-guided")
    out = tmp_path / "shot.png"
    script = Path(__file__).resolve().parent / "render_screenshot.py"
    done = subprocess.run([sys.executable, str(script), "--ct", str(tmp_path / "ct.nii.gz"), "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MEDDIFFSEG_HOME=str(home)))
    if done.returncode != 0 and not out.exists() and ("OpenGL" in done.stderr or "EGL" in done.stderr
                                                      or done.returncode < 0):
        pytest.skip(f"VTK cannot render offscreen here (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["threshold"] == nodes.DEFAULT_THRESHOLD and info["model"] == "tiny-guided"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (960, 720)
    reader = __import__("vtk").vtkPNGReader()
    reader.SetFileName(str(out))
    reader.Update()
    pixels = numpy_support.vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars()).reshape(720, 960, -1)
    red = (pixels[..., 0].astype(int) - pixels[..., 2].astype(int)) > 100
    assert red.sum() > 200, "neither the overlay nor the legend was drawn"
