"""``MedDiffSegLogic().segment(...)`` in-process on real MRML, with a tiny random-weight model.

The real example CT (NIfTI) and the real DICOM series are loaded through storage nodes / the
library, segmented by the Logic, and compared voxel for voxel with the library's
``segment_volume`` run directly on the same image: segment names, colours, terminology, labelmap
geometry (= the volume's), voxels, the uncertainty volume's IJK->RAS and values. Cancelling
mid-run and failing runs must leave the scene exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from MedDiffSegLib.errors import Cancelled, ModelError
from MedDiffSegLib.inference import segment_volume
from MedDiffSegLogicLib import geometry, nodes, presets

from slicer_harness import ORGANS, SAMPLES, SEED, assert_scene_unchanged, scene_state


# -- fixtures ---------------------------------------------------------------------------------------------


def assert_result_matches_library(slicer, result, volume_node, reference, package):
    labels = sitk.GetArrayViewFromImage(reference.labels)
    uncertainty = sitk.GetArrayViewFromImage(reference.uncertainty)
    segmentation_node = result.segmentationNode
    segmentation = segmentation_node.GetSegmentation()
    # one segment per organ: ID = organ name, name = display name, model card colour and codes
    assert segmentation.GetNumberOfSegments() == len(ORGANS)
    assert [segmentation.GetNthSegmentID(i) for i in range(len(ORGANS))] == ORGANS
    for organ_name in ORGANS:
        organ = package.organs[package.organ_names.index(organ_name)]
        segment = segmentation.GetSegment(organ_name)
        assert segment.GetName() == organ.display_name
        assert np.allclose(segment.GetColor(), np.array(organ.color) / 255.0)
        terminology = segment.GetTerminology()
        for code in (organ.category, organ.type):
            assert f"{code['scheme']}^{code['code']}^{code['meaning']}" in terminology
    # labelmap geometry = the input volume's; voxels where the library put them
    for label, organ_name in enumerate(ORGANS, start=1):
        internal = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(organ_name, internal)
        matrix = vtk.vtkMatrix4x4()
        internal.GetImageToWorldMatrix(matrix)
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        assert np.allclose(m, geometry.ijkToRasArray(volume_node), atol=1e-9)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, organ_name, volume_node)
        assert mask.shape == labels.shape
        assert np.array_equal(mask.astype(bool), labels == label), organ_name
    # all segments exported to one label map on the reference geometry == the library's label map
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    for organ_name in ORGANS:
        ids.InsertNextValue(organ_name)
    assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node)
    assert np.array_equal(slicer.util.arrayFromVolume(labelmap), labels)
    assert np.allclose(geometry.ijkToRasArray(labelmap), geometry.ijkToRasArray(volume_node), atol=1e-9)
    slicer.mrmlScene.RemoveNode(labelmap)
    # uncertainty: the input's exact IJK->RAS, the library's values, a colour map
    unc = result.uncertaintyNode
    assert np.array_equal(geometry.ijkToRasArray(unc), geometry.ijkToRasArray(volume_node))
    assert slicer.util.arrayFromVolume(unc).dtype == np.float32
    assert np.array_equal(slicer.util.arrayFromVolume(unc), uncertainty)
    display = unc.GetDisplayNode()
    assert display is not None and display.GetColorNodeID() in nodes.COLOR_MAPS[nodes.DEFAULT_COLOR_MAP]
    assert display.GetWindowLevelMin() == 0.0 and display.GetWindowLevelMax() == pytest.approx(float(uncertainty.max()))
    # the numbers
    for stats, organ in zip(reference.stats, result.organs):
        assert organ["name"] == stats.name
        assert organ["volume_ml"] == pytest.approx(stats.volume_ml)
        assert organ["mean_uncertainty"] == pytest.approx(stats.mean_uncertainty)


# -- the Logic on the real CT ---------------------------------------------------------------------------------------


def test_segment_real_ct_matches_the_library(mrml, slicer, module, ct_node, library_ct, tiny_package):
    before = scene_state(mrml, ct_node)
    seen = []
    result = module.MedDiffSegLogic().segment(ct_node, ORGANS, samples=SAMPLES, seed=SEED, model=tiny_package,
                                              device="cpu", progress=lambda *a: seen.append(a))
    # exactly the result nodes were added (checked before the helpers below add their own temporary nodes)
    added = [mrml.scene.GetNodeByID(i) for i in nodes.nodeIDs(mrml.scene) if i not in before["ids"]]
    assert seen and seen[-1][1] == 1.0
    assert_result_matches_library(slicer, result, ct_node, library_ct, tiny_package)
    # the input is untouched
    assert np.array_equal(geometry.volumeArray(ct_node), before["voxels"])
    assert np.array_equal(geometry.ijkToRasArray(ct_node), before["ijkToRas"])
    assert {n.GetClassName() for n in added} <= {"vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode",
                                                 "vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode"}
    assert result.segmentationNode in added and result.uncertaintyNode in added
    assert result.segmentationNode.GetName() == "example_ct MedDiffSeg"
    assert result.uncertaintyNode.GetName() == "example_ct uncertainty"
    assert result.segmentationNode.GetAttribute("MedDiffSeg.Model") == tiny_package.name
    assert result.segmentationNode.GetNodeReference("MedDiffSegUncertainty") is result.uncertaintyNode
    assert "cpu" in result.device


def test_segment_dicom_series_matches_the_library(mrml, slicer, module, data_dir, tiny_package):
    from MedDiffSegLib.io.volume import read_dicom_series

    image, _ = read_dicom_series(data_dir / "totalsegmentator" / "example_ct_dicom")
    node = geometry.volumeNodeFromImage(image, "example_ct_dicom")
    reference = segment_volume(image, tiny_package, ORGANS, samples=SAMPLES, seed=SEED, device="cpu")
    result = module.MedDiffSegLogic().segment(node, ORGANS, samples=SAMPLES, seed=SEED, model=tiny_package, device="cpu")
    assert_result_matches_library(slicer, result, node, reference, tiny_package)


# -- cancel and failure leave the scene as it was ----------------------------------------------------------------------


def test_cancel_mid_run_leaves_the_scene_and_input_unchanged(mrml, module, ct_node, tiny_package):
    before = scene_state(mrml, ct_node)
    stages = []

    def progress(stage, fraction, message):
        stages.append((stage, fraction))

    def should_cancel():
        return any(stage == "network" for stage, _ in stages)  # cancel once sampling has started

    with pytest.raises(Cancelled):
        module.MedDiffSegLogic().segment(ct_node, ORGANS, samples=SAMPLES, seed=SEED, model=tiny_package,
                                         device="cpu", progress=progress, shouldCancel=should_cancel)
    assert any(stage == "network" for stage, _ in stages) and max(f for _, f in stages) < 1.0, "not cancelled mid-run"
    assert_scene_unchanged(before, mrml, ct_node)


def test_invalid_request_fails_before_any_node_is_added(mrml, module, ct_node, tiny_package):
    before = scene_state(mrml, ct_node)
    logic = module.MedDiffSegLogic()
    with pytest.raises(ModelError, match="does not know organ"):
        logic.segment(ct_node, ["kidney"], model=tiny_package, device="cpu")
    with pytest.raises(ModelError, match="at least one organ"):
        logic.segment(ct_node, [], model=tiny_package, device="cpu")
    with pytest.raises(ModelError, match="not installed"):
        logic.segment(ct_node, ORGANS, model="no-such-model", device="cpu")
    with pytest.raises(ValueError, match="unknown device"):
        logic.segment(ct_node, ORGANS, model=tiny_package, device="TPU")
    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(ValueError, match="not a grey-level"):
        logic.segment(labelmap, ORGANS, model=tiny_package, device="cpu")
    mrml.scene.RemoveNode(labelmap)
    assert_scene_unchanged(before, mrml, ct_node)


def small_volume(slicer, name="small", shape=(6, 40, 48)):
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    array = np.where(((x - shape[2] / 2) / 18.0) ** 2 + ((y - shape[1] / 2) / 14.0) ** 2 < 1, 60, -1000).astype(np.int16)
    node = slicer.util.addVolumeFromArray(array, name=name)
    node.SetSpacing(4.0, 4.5, 5.0)
    node.SetOrigin(90.0, -12.5, 300.0)
    node.SetIJKToRASDirections([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    return node


def test_failure_while_building_nodes_rolls_back(mrml, slicer, module, tiny_package, monkeypatch):
    volume = small_volume(slicer)
    before = scene_state(mrml, volume)
    calls = {"n": 0}
    real = nodes.terminologyEntry

    def failing(category, type_):
        calls["n"] += 1
        if calls["n"] == 2:  # after the uncertainty node, the segmentation node and one segment exist
            raise RuntimeError("simulated failure while filling the segmentation")
        return real(category, type_)

    monkeypatch.setattr(nodes, "terminologyEntry", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        module.MedDiffSegLogic().segment(volume, ORGANS, samples=2, model=tiny_package, device="cpu")
    assert calls["n"] == 2
    assert_scene_unchanged(before, mrml, volume)


def test_existing_segmentation_is_updated_and_restored_on_failure(mrml, slicer, module, tiny_package, monkeypatch):
    volume = small_volume(slicer)
    target = nodes.createSegmentationNode(mrml.scene, volume, "my segmentation")
    segmentation = target.GetSegmentation()
    segmentation.AddEmptySegment("other", "Other", [0.1, 0.2, 0.3])
    segmentation.AddEmptySegment("liver", "Old liver", [0.0, 1.0, 0.0])
    other = np.zeros(geometry.volumeArray(volume).shape, np.uint8)
    other[1:3, 5:9, 5:9] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other, target, "other", volume)
    logic = module.MedDiffSegLogic()

    # a failure halfway restores the segments the node had
    monkeypatch.setattr(nodes, "terminologyEntry", lambda c, t: (_ for _ in ()).throw(RuntimeError("boom")))
    count = mrml.node_count()
    with pytest.raises(RuntimeError, match="boom"):
        logic.segment(volume, ORGANS, samples=2, model=tiny_package, device="cpu", segmentationNode=target)
    monkeypatch.undo()
    assert mrml.node_count() == count
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["Other", "Old liver"]
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(target, "other", volume), other)

    # success: organ segments replaced/added, other segments kept
    result = logic.segment(volume, ORGANS, samples=2, model=tiny_package, device="cpu", segmentationNode=target)
    assert result.segmentationNode is target
    names = {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i).GetName()
             for i in range(segmentation.GetNumberOfSegments())}
    assert names == {"other": "Other", "liver": "Liver", "spleen": "Spleen"}
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(target, "other", volume), other)


# -- review: overlay, jump, batch --------------------------------------------------------------------------------------


def test_overlay_and_jump_to_most_uncertain_slice(mrml, slicer, module, tiny_package):
    views = mrml.add_slice_views()
    volume = small_volume(slicer)
    logic = module.MedDiffSegLogic()
    result = logic.segment(volume, ORGANS, samples=3, seed=5, model=tiny_package, device="cpu")
    logic.showUncertainty(result, True, 0.35)
    for _, composite in views:
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == result.uncertaintyNode.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.35)
    logic.showUncertainty(result, False)
    assert all(c.GetForegroundVolumeID() is None for _, c in views)
    nodes.setUncertaintyDisplay(result.uncertaintyNode, "Hot")
    assert result.uncertaintyNode.GetDisplayNode().GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"

    organ = result.organ("liver")
    ras = logic.jumpToMostUncertainSlice(result, "liver")
    assert organ["max_uncertainty_position_mm"] is not None, "3 random-weight samples should disagree somewhere"
    assert ras == pytest.approx(geometry.lpsToRas(organ["max_uncertainty_position_mm"]))
    for slice_node, _ in views:
        assert slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[:3, 3] == pytest.approx(ras)
    # the RAS point lies on the slice the library named (K index of the canonical axial slice)
    ijk = np.linalg.solve(geometry.ijkToRasArray(volume), np.array([*ras, 1.0]))[:3]
    axis = 2 - organ["slice_axis"]  # numpy axis 0 = K
    assert ijk[axis] == pytest.approx(organ["max_uncertainty_slice"])


def test_segment_batch_makes_one_result_per_volume(mrml, slicer, module, tiny_package):
    volumes = [small_volume(slicer, "first"), small_volume(slicer, "second", shape=(4, 32, 40))]
    results = module.MedDiffSegLogic().segmentBatch(volumes, ["spleen"], samples=2, model=tiny_package, device="cpu")
    assert [r.volumeNode for r in results] == volumes
    assert len({r.segmentationNode.GetID() for r in results}) == 2
    for r, v in zip(results, volumes):
        assert r.segmentationNode.GetName() == f"{v.GetName()} MedDiffSeg"
        assert slicer.util.arrayFromVolume(r.uncertaintyNode).shape == geometry.volumeArray(v).shape


# -- module pieces that run without Qt ---------------------------------------------------------------------------------


def test_module_self_test_runs_on_real_mrml(mrml, module):
    module.MedDiffSegTest().runTest()


def test_module_description_and_parameter_node(mrml, module):
    parent = type("Parent", (), {})()
    module.MedDiffSeg(parent)
    assert parent.title == "MedDiffSeg" and parent.categories == ["Segmentation"]
    assert parent.contributors and "Segment" in parent.helpText
    logic = module.MedDiffSegLogic()
    p = logic.getParameterNode()
    assert p.quality == presets.DEFAULT_PRESET and p.samples == presets.QUALITY_PRESETS[presets.DEFAULT_PRESET].samples
    assert p.device == "Auto" and p.colorMap == nodes.DEFAULT_COLOR_MAP and p.organs == []
    p.organs = ["liver"]
    p.samples = 10
    again = logic.getParameterNode()  # the same scripted module node, found again in the scene
    assert again.organs == ["liver"] and again.samples == 10
    assert set(module.MedDiffSegParameterNode.allParameters) >= {"inputVolume", "outputSegmentation", "quality", "samples",
                                                                "steps", "seed", "device", "uncertaintyOpacity"}


def test_device_info_and_cpu_estimate(mrml, module, ct_node, tiny_package, library_ct):
    import torch

    from MedDiffSegLogicLib.process import DeviceProbeError

    logic = module.MedDiffSegLogic()
    logic._deviceCache.clear()
    description, is_gpu = logic.deviceInfo("CPU")  # asked of a worker process (no torch/CUDA in Slicer's)
    assert description.startswith("cpu") and not is_gpu
    assert logic.deviceInfo("CPU") == (description, is_gpu) and "cpu" in logic._deviceCache
    if not torch.cuda.is_available():
        with pytest.raises(DeviceProbeError, match="CUDA is not available"):
            logic.deviceInfo("GPU")
    from MedDiffSegLogicLib.segmentation import SegmentOptions

    options = SegmentOptions(ORGANS, model=tiny_package, samples=SAMPLES)
    seconds = logic.estimateSeconds(ct_node, options)
    assert seconds > 0
    # the estimate counts the same windows the engine used
    superior = abs(geometry.directionsRAS(ct_node)[2, :])
    evaluations = presets.networkEvaluations(ct_node.GetImageData().GetDimensions(), ct_node.GetSpacing(), tiny_package,
                                             len(ORGANS), SAMPLES, 1, sliceAxis=int(superior.argmax()))
    slices = ct_node.GetImageData().GetDimensions()[int(superior.argmax())]
    assert evaluations == slices * library_ct.extras["windows_per_slice"] * len(ORGANS) * SAMPLES


def test_every_shipped_package_is_in_the_model_list(mrml, module):
    """The module lists the library's packages as they are: each built-in one, by method, with its scores."""
    from MedDiffSegLib.registry import ModelPackage, PackageInfo
    from MedDiffSegLib.registry.store import builtin_models_dir

    logic = module.MedDiffSegLogic()
    packages = logic.listModels()
    assert all(isinstance(p, PackageInfo) for p in packages)  # read from model.json: no torch in Slicer's process
    listed = {p.name: p for p in packages}
    shipped = sorted(d.name for d in builtin_models_dir().iterdir() if (d / "model.json").is_file())
    assert len(shipped) >= 1 and set(shipped) <= set(listed)
    assert logic.defaultModelName() in shipped
    for name in shipped:
        package = logic.modelPackage(name)
        full = ModelPackage.from_folder(package.path)
        assert (package.method_name, package.organ_names, package.metrics) == (full.method_name, full.organ_names, full.metrics)
        text = logic.modelDescription(package)
        assert f"method {package.method_name}" in text
        assert text.endswith(presets.scoreSummary(package.metrics))
        if "evaluation" in package.metrics:
            assert "Dice on unseen" in text, text
