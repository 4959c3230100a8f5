"""Export DICOM-SEG from the Slicer module, on real MRML (slicer-core) and the real 20-slice CT series.

The volume is loaded from the series' files through a storage node, as Slicer's DICOM plugin
does, with ``DICOM.instanceUIDs`` set to the series' SOP Instance UIDs. A stand-in DICOM database
maps those UIDs to the files (Slicer's ``slicer.dicomDatabase`` and ``DICOMLib`` are not in the
slicer-core wheel) and records what is imported into it. The Logic segments the volume with a tiny
random-weight model, the segmentation is edited as a user would, and the export is read back with
the library's ``read_dicom_seg``: voxel for voxel the segmentation node's labelmap on the source
grid, with the model's segment names and codes; the Parametric Map holds the uncertainty volume.

Volumes not from DICOM get an explanation and .seg.nrrd + NIfTI files instead; every failure
leaves no file and no folder behind.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedDiffSegLib.dicom import PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE, read_dicom_seg
from MedDiffSegLib.errors import InputError, ModelError
from MedDiffSegLogicLib import dicomexport, geometry, nodes

from slicer_harness import ORGANS, SAMPLES, SEED


# -- a stand-in for Slicer's DICOM database --------------------------------------------------------------


class FakeDicomDatabase:
    """The :class:`~MedDiffSegLogicLib.dicomexport.DicomDatabase` protocol over a dict UID -> file."""

    def __init__(self, files_by_uid: dict[str, str], fail_import: bool = False):
        self.files = dict(files_by_uid)
        self.imported: list[str] = []
        self.removed: list[str] = []
        self.fail_import = fail_import

    def fileForInstance(self, sopInstanceUID: str) -> str:
        return self.files.get(sopInstanceUID, "")

    def importFiles(self, paths) -> None:
        if self.fail_import:
            raise RuntimeError("simulated DICOM database failure")
        for path in paths:
            self.imported.append(str(path))
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.files[str(ds.SOPInstanceUID)] = str(path)

    def removeSeries(self, seriesInstanceUID: str) -> None:
        self.removed.append(seriesInstanceUID)


def sop_instance_uid(path: Path) -> str:
    """The file's SOP Instance UID; this series leaves it empty in the data set (docs/dicom.md), the file
    meta information has it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.get("SOPInstanceUID", "") or ds.file_meta.MediaStorageSOPInstanceUID)


@pytest.fixture(scope="session")
def series(data_dir):
    folder = data_dir / "totalsegmentator" / "example_ct_dicom"
    files = sorted(str(p) for p in folder.iterdir() if p.is_file())
    uids = [sop_instance_uid(Path(f)) for f in files]
    assert len(files) == 20 and len(set(uids)) == 20 and all(uids)
    return types.SimpleNamespace(folder=folder, files=files, uids=uids)


@pytest.fixture
def database(series):
    return FakeDicomDatabase(dict(zip(series.uids, series.files)))


def load_dicom_volume(slicer, scene, series, name="CT from DICOM"):
    """The series read by a storage node from its file list, tagged as Slicer's DICOM plugin tags it."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(series.files[0])
    for f in series.files:
        storage.AddFileName(f)
    storage.SetSingleFile(0)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    assert storage.ReadData(node)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(series.uids))
    return node


@pytest.fixture
def dicom_result(mrml, slicer, module, series, tiny_package):
    volume = load_dicom_volume(slicer, mrml.scene, series)
    result = module.MedDiffSegLogic().segment(volume, ORGANS, samples=SAMPLES, seed=SEED, model=tiny_package,
                                              device="cpu")
    return result


def node_labelmap(slicer, result, organs=ORGANS) -> np.ndarray:
    """Label i = organs[i-1], from the segmentation node on the volume's grid (Slicer's own export)."""
    labels = np.zeros(geometry.volumeArray(result.volumeNode).shape, np.uint8)
    for label, organ in enumerate(organs, start=1):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, organ, result.volumeNode)
        labels[mask != 0] = label
    return labels


def edit_like_a_user(slicer, result):
    """Change the segmentation after the run (Segment Editor): the export must take the node's labelmap."""
    volume = result.volumeNode
    spleen = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, "spleen", volume)
    liver = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, "liver", volume)
    spleen[:] = 0
    spleen[3:9, 100:160, 200:300] = 1  # a box drawn by hand
    liver[3:9, 100:160, 200:300] = 0  # "overwrite other segments", as the editor does by default
    slicer.util.updateSegmentBinaryLabelmapFromArray(spleen, result.segmentationNode, "spleen", volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(liver, result.segmentationNode, "liver", volume)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*")) if Path(folder).exists() else []


# -- DICOM-SEG + Parametric Map from a volume of the DICOM database ---------------------------------------------


def test_export_dicom_seg_round_trip(mrml, slicer, module, series, database, dicom_result, tiny_package, tmp_path):
    result = dicom_result
    edit_like_a_user(slicer, result)
    expected = node_labelmap(slicer, result)
    assert (expected == 1).any() and (expected == 2).sum() == 6 * 60 * 100
    logic = module.MedDiffSegLogic()
    assert logic.canExportDicomSeg(result.volumeNode, database) == (True, "")
    nodes_before = mrml.node_count()

    out = tmp_path / "export"
    report = logic.exportDicomSeg(result, str(out), database=database)  # model found from the run's record

    assert mrml.node_count() == nodes_before, "the export must not leave nodes in the scene"
    seg_path, pmap_path = out / dicomexport.SEG_FILE, out / dicomexport.PMAP_FILE
    assert report.dicom and report.paths == [seg_path, pmap_path]
    assert seg_path.is_file() and pmap_path.is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([seg_path.name, pmap_path.name])  # no temporary left
    # the database received both files, and knows them by their SOP Instance UIDs
    assert database.imported == [str(seg_path), str(pmap_path)] and report.addedToDatabase
    for record in report.records:
        assert database.fileForInstance(record.sop_instance_uid) == str(record.path)
    assert "DICOM-SEG with 2 segment(s) (Liver, Spleen)" in report.message()
    assert report.model == f"{tiny_package.name} {tiny_package.version}"

    # SEG: read back on the source series' grid == the segmentation node's labelmap, voxel for voxel
    back = read_dicom_seg(seg_path, series.files)
    volume_image = geometry.imageFromVolumeNode(result.volumeNode)
    assert back.labels.GetSize() == volume_image.GetSize()
    assert np.allclose(back.labels.GetSpacing(), volume_image.GetSpacing(), rtol=1e-6)
    assert np.allclose(back.labels.GetOrigin(), volume_image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.labels.GetDirection(), volume_image.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(back.labels), expected)
    assert back.segmentation_type == "BINARY"
    # segment names, codes and colours: the model's, and the ones the segments carry in Slicer
    segmentation = result.segmentationNode.GetSegmentation()
    assert [s.number for s in back.segments] == [1, 2]
    for info, organ_name in zip(back.segments, ORGANS):
        organ = tiny_package.organs[tiny_package.organ_names.index(organ_name)]
        assert info.label == organ.display_name == segmentation.GetSegment(organ_name).GetName()
        assert info.category == organ.category and info.type == organ.type
        terminology = segmentation.GetSegment(organ_name).GetTerminology()
        for code in (info.category, info.type):
            assert f"{code['scheme']}^{code['code']}^{code['meaning']}" in terminology
        assert info.algorithm_type == "AUTOMATIC" and info.algorithm_name == tiny_package.name
        assert info.voxels == int((expected == info.number).sum())
        assert np.allclose(info.color_rgb, organ.color, atol=2)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(series.uids)

    # Parametric Map: same study and frame of reference, one frame per slice holding the uncertainty volume
    pm = pydicom.dcmread(pmap_path)
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE
    assert pm.FrameOfReferenceUID == seg.FrameOfReferenceUID and pm.StudyInstanceUID == seg.StudyInstanceUID
    assert pm.SeriesInstanceUID != seg.SeriesInstanceUID
    uncertainty = slicer.util.arrayFromVolume(result.uncertaintyNode)
    origin_lps = np.asarray(volume_image.GetOrigin())
    normal = np.asarray(volume_image.GetDirection()).reshape(3, 3)[:, 2]
    pixels = pm.pixel_array
    assert pixels.shape == uncertainty.shape
    for f, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = int(round(float(np.dot(position - origin_lps, normal)) / volume_image.GetSpacing()[2]))
        assert np.array_equal(pixels[f], uncertainty[k]), f"frame {f + 1} (slice {k})"


def test_export_runs_in_a_slicer_where_torch_is_not_installed(mrml, slicer, series, database, dicom_result, tmp_path,
                                                              monkeypatch):
    """DICOM export needs highdicom, never torch: nothing on its path may import torch in Slicer's process."""
    from test_slicer_widget import NOT_BUNDLED, FreshSlicer

    env = FreshSlicer(slicer, monkeypatch)
    try:
        for name in NOT_BUNDLED:  # everything the export needs is installed; torch is not
            env.make_installed(name)
        report = env.module.MedDiffSegLogic().exportDicomSeg(dicom_result, str(tmp_path / "export"), database=database)
        assert report.dicom and all(Path(p).is_file() for p in report.paths)
        torch_imports = [a for a in env.blocker.attempts if a.split(".")[0] == "torch"]
        assert not torch_imports, "\n".join(env.blocker.stacks)
    finally:
        env.restore()


def test_export_into_a_new_temporary_folder_by_default(mrml, slicer, module, database, dicom_result, tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr(slicer.app, "temporaryPath", str(tmp_path))
    report = module.MedDiffSegLogic().exportDicomSeg(dicom_result.segmentationNode, database=database,
                                                     includeUncertainty=False)
    assert report.dicom and len(report.paths) == 1 and report.pmapPath is None
    assert report.segPath.parent.parent == tmp_path and report.segPath.parent.name.startswith("MedDiffSeg-DICOM-")
    assert database.imported == [str(report.segPath)]
    assert "added to Slicer's DICOM database" in report.message()


def test_dicom_export_availability_explains(mrml, slicer, module, series, database, dicom_result):
    logic = module.MedDiffSegLogic()
    volume = dicom_result.volumeNode
    ok, reason = logic.canExportDicomSeg(volume, None)  # slicer-core has no slicer.dicomDatabase
    assert not ok and "DICOM database is not open" in reason
    partial = FakeDicomDatabase(dict(zip(series.uids[:-1], series.files[:-1])))
    ok, reason = logic.canExportDicomSeg(volume, partial)
    assert not ok and "no longer in Slicer's DICOM database" in reason
    with pytest.raises(dicomexport.NotFromDicomError, match="1 of the 20 DICOM images"):
        logic.exportDicomSeg(dicom_result, database=partial)
    plain = slicer.util.addVolumeFromArray(np.zeros((2, 3, 4), np.int16), name="not dicom")
    ok, reason = logic.canExportDicomSeg(plain, database)
    assert not ok and "was not loaded from DICOM" in reason and ".seg.nrrd" in reason
    assert logic.canExportDicomSeg(None, database)[0] is False


# -- volumes that are not from DICOM: explanation and files instead ---------------------------------------------------


def test_non_dicom_volume_explains_and_writes_seg_nrrd_and_nifti(mrml, slicer, module, ct_node, database,
                                                                  tiny_package, tmp_path):
    logic = module.MedDiffSegLogic()
    result = logic.segment(ct_node, ORGANS, samples=SAMPLES, seed=SEED, model=tiny_package, device="cpu")
    ok, reason = logic.canExportDicomSeg(ct_node, database)
    assert not ok and "not loaded from DICOM" in reason
    with pytest.raises(dicomexport.NotFromDicomError, match="not loaded from DICOM.*seg.nrrd"):
        logic.exportDicomSeg(result, database=database)
    nodes_before = mrml.node_count()

    out = tmp_path / "files"
    report = logic.exportDicomSeg(result, str(out), database=database)

    assert not report.dicom and "not loaded from DICOM" in report.explanation and ".seg.nrrd" in report.explanation
    assert report.message().startswith(report.explanation)
    base = dicomexport.safeFileName(result.segmentationNode.GetName())
    expected_files = [out / f"{base}.seg.nrrd", out / f"{base}_labels.nii.gz", out / f"{base}_uncertainty.nii.gz"]
    assert report.paths == expected_files and files_under(out) == sorted(expected_files)
    assert database.imported == [] and mrml.node_count() == nodes_before
    # the NIfTI label map = the segmentation node's labelmap on the volume's grid; uncertainty exact
    expected = node_labelmap(slicer, result)
    labels, matrix, dims = nodes.readVolumeFile(str(expected_files[1]), label=True)
    assert geometry.sameGrid(dims, matrix, geometry.dimensions(ct_node), geometry.ijkToRasArray(ct_node))
    assert np.array_equal(labels, expected)
    assert "1 = Liver, 2 = Spleen" in " ".join(report.notes)
    unc, matrix, dims = nodes.readVolumeFile(str(expected_files[2]))
    assert geometry.sameGrid(dims, matrix, geometry.dimensions(ct_node), geometry.ijkToRasArray(ct_node))
    assert np.array_equal(unc, slicer.util.arrayFromVolume(result.uncertaintyNode))
    # the .seg.nrrd reads back into a segmentation node with the same segments, names and voxels
    loaded = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(expected_files[0]))
    assert storage.ReadData(loaded)
    segmentation = loaded.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Liver", "Spleen"]
    for label, organ in enumerate(ORGANS, start=1):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(loaded, organ, ct_node)
        assert np.array_equal(mask != 0, expected == label), organ
    # a second export into the same folder refuses to overwrite, and changes nothing
    stamps = {p: p.stat().st_mtime_ns for p in expected_files}
    with pytest.raises(dicomexport.ExportError, match="already exist"):
        logic.exportSegmentationFiles(result, str(out))
    assert {p: p.stat().st_mtime_ns for p in expected_files} == stamps and files_under(out) == sorted(expected_files)


# -- errors leave nothing behind ---------------------------------------------------------------------------------------


def test_failures_leave_no_files(mrml, slicer, module, series, database, dicom_result, tmp_path, monkeypatch):
    logic = module.MedDiffSegLogic()
    result = dicom_result

    # the DICOM database refuses the files: both files and the folder created for them are removed,
    # and the database is asked to forget the series
    failing = FakeDicomDatabase(dict(zip(series.uids, series.files)), fail_import=True)
    out = tmp_path / "new" / "folder"
    with pytest.raises(RuntimeError, match="simulated DICOM database failure"):
        logic.exportDicomSeg(result, str(out), database=failing)
    assert not (tmp_path / "new").exists()
    assert len(failing.removed) == 2 and failing.imported == []

    # the Parametric Map cannot be written after the SEG was: the SEG is removed again
    import MedDiffSegLib.dicom.export as library_export

    real_write = library_export.write_dataset_atomic
    calls = []

    def write_then_fail(ds, path):
        calls.append(path)
        if len(calls) == 2:
            from MedDiffSegLib.errors import OutputError

            raise OutputError(f"cannot write {path}: simulated disk full")
        return real_write(ds, path)

    monkeypatch.setattr(library_export, "write_dataset_atomic", write_then_fail)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="simulated disk full"):
        logic.exportDicomSeg(result, str(existing), database=database)
    monkeypatch.undo()
    assert len(calls) == 2 and files_under(existing) == [existing / "keep.txt"]
    assert database.imported == []

    # the volume's geometry no longer matches its series: the library's error names the mismatch
    volume = result.volumeNode
    origin = volume.GetOrigin()
    volume.SetOrigin(origin[0] + 5.0, origin[1], origin[2])
    with pytest.raises(InputError, match="origin differs"):
        logic.exportDicomSeg(result, str(tmp_path / "moved"), database=database)
    volume.SetOrigin(*origin)
    assert not (tmp_path / "moved").exists()

    # an empty segmentation is refused by the library before anything is written
    for organ in ORGANS:
        empty = np.zeros(geometry.volumeArray(volume).shape, np.uint8)
        slicer.util.updateSegmentBinaryLabelmapFromArray(empty, result.segmentationNode, organ, volume)
    with pytest.raises(InputError, match="segmentation is empty"):
        logic.exportDicomSeg(result, str(tmp_path / "empty"), database=database)
    assert not (tmp_path / "empty").exists() and database.imported == []

    # an unknown model: a readable ModelError, nothing written
    with pytest.raises(ModelError, match="not installed"):
        logic.exportDicomSeg(result, str(tmp_path / "model"), database=database, model="no-such-model")
    assert not (tmp_path / "model").exists()


def test_file_export_failure_leaves_no_files(mrml, slicer, module, dicom_result, tmp_path, monkeypatch):
    real = nodes.writeVolumeNode

    def fail_on_uncertainty(node, path, compress=False):
        if "uncertainty" in Path(path).name:
            raise OSError(f"could not write {path}")
        return real(node, path, compress)

    monkeypatch.setattr(nodes, "writeVolumeNode", fail_on_uncertainty)
    out = tmp_path / "a" / "b"
    with pytest.raises(dicomexport.ExportError, match="could not write") as failure:
        module.MedDiffSegLogic().exportSegmentationFiles(dicom_result, str(out))
    assert ".MedDiffSeg-export" not in str(failure.value) and f"{out}/" in str(failure.value)
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(dicomexport.ExportError, match="could not write"):
        module.MedDiffSegLogic().exportSegmentationFiles(dicom_result, str(existing))
    assert files_under(existing) == []


def test_segments_that_are_not_organs_and_overlaps_are_reported(mrml, slicer, module, database, dicom_result, tmp_path):
    result = dicom_result
    volume = result.volumeNode
    segmentation = result.segmentationNode.GetSegmentation()
    segmentation.AddEmptySegment("tumour", "Tumour", [1.0, 1.0, 0.0])
    liver = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, "liver", volume)
    spleen = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, "spleen", volume)
    overlap_box = (slice(0, 2), slice(0, 10), slice(0, 10))
    liver[overlap_box] = 1
    spleen[overlap_box] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(liver, result.segmentationNode, "liver", volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(spleen, result.segmentationNode, "spleen", volume)
    report = module.MedDiffSegLogic().exportDicomSeg(result, str(tmp_path / "out"), database=database)
    text = report.message()
    assert "segment 'Tumour' was left out (not an organ of model tiny-guided)" in text
    assert "segment 'Spleen' overlaps 'Liver' in 200 voxel(s)" in text
    back = sitk.GetArrayFromImage(read_dicom_seg(report.segPath, geometry.imageFromVolumeNode(volume)).labels)
    assert (back[overlap_box] == 2).all()


# -- the adapter for Slicer's DICOM database ---------------------------------------------------------------------------


class FakeCtkDatabase:
    """The few ctkDICOMDatabase methods the adapter calls."""

    def __init__(self, is_open=True):
        self.isOpen = is_open
        self.inserted: list[str] = []
        self.removed: list[str] = []

    def fileForInstance(self, uid):
        return {"1.2.3": "/data/a.dcm"}.get(uid)

    def insert(self, path):
        self.inserted.append(path)

    def removeSeries(self, uid):
        self.removed.append(uid)


def test_slicer_dicom_database_adapter(slicer, tmp_path, monkeypatch):
    files = []
    for name in ("segmentation.dcm", "uncertainty_pmap.dcm"):
        (tmp_path / name).write_bytes(name.encode())
        files.append(str(tmp_path / name))
    (tmp_path / "unrelated.dcm").write_bytes(b"not ours")
    ctk_db = FakeCtkDatabase()
    seen = {}

    def import_dicom(folder, database, copyFiles=False):
        seen["files"] = sorted(p.name for p in Path(folder).iterdir())
        seen["database"], seen["copy"] = database, copyFiles
        return seen.get("result", True)

    utils = types.SimpleNamespace(importDicom=import_dicom)
    adapter = dicomexport.SlicerDicomDatabase(ctk_db, dicomUtils=utils)
    assert isinstance(adapter, dicomexport.DicomDatabase)
    assert adapter.fileForInstance("1.2.3") == "/data/a.dcm" and adapter.fileForInstance("9.9") == ""
    adapter.importFiles(files)
    # only the exported files are imported, copied into the database, from a staging folder removed afterwards
    assert seen == {"files": ["segmentation.dcm", "uncertainty_pmap.dcm"], "database": ctk_db, "copy": True}
    seen["result"] = False
    with pytest.raises(dicomexport.ExportError, match="did not import"):
        adapter.importFiles(files)
    adapter.removeSeries("1.2.9")
    assert ctk_db.removed == ["1.2.9"]

    # without DICOMLib: ctkDICOMDatabase.insert, file by file
    monkeypatch.setitem(__import__("sys").modules, "DICOMLib", None)
    dicomexport.SlicerDicomDatabase(ctk_db).importFiles(files)
    assert ctk_db.inserted == files

    # the application's database: none, closed, open
    monkeypatch.delattr(slicer, "dicomDatabase", raising=False)
    assert dicomexport.SlicerDicomDatabase.fromApplication() is None
    monkeypatch.setattr(slicer, "dicomDatabase", FakeCtkDatabase(is_open=False), raising=False)
    assert dicomexport.SlicerDicomDatabase.fromApplication() is None
    monkeypatch.setattr(slicer, "dicomDatabase", ctk_db, raising=False)
    assert dicomexport.SlicerDicomDatabase.fromApplication().database is ctk_db


# -- the Widget's export handlers, with plain objects for its widgets (no Qt here) --------------------------------


def make_widget(module, logic):
    widget = module.MedDiffSegWidget()  # __init__ only: setup() needs Qt
    widget.logic = logic
    names = ("exportDicomSegButton", "exportFilesButton", "exportInfoLabel", "statusLabel")
    widget.ui = types.SimpleNamespace(**{name: types.SimpleNamespace(enabled=None, toolTip="", text="") for name in names})
    return widget


def test_widget_export_buttons_and_messages(mrml, slicer, module, series, database, dicom_result, tiny_package,
                                            tmp_path, monkeypatch):
    shown = {"errors": [], "confirm": []}
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown["errors"].append((text, kw)))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, **kw: shown["confirm"].append(text) or False)  # "Cancel"
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *args: True)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)  # sets a Qt cursor
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None)  # the dialogs' parent
    logic = module.MedDiffSegLogic()
    current = {"database": database}
    monkeypatch.setattr(logic, "dicomDatabase", lambda: current["database"])
    monkeypatch.setattr(logic, "temporaryFolder", lambda: str(tmp_path))
    widget = make_widget(module, logic)

    widget.updateExportState()  # no result yet
    assert widget.ui.exportDicomSegButton.enabled is False and widget.ui.exportFilesButton.enabled is False

    widget._lastResult = dicom_result
    widget.updateExportState()
    assert widget.ui.exportDicomSegButton.enabled is True and widget.ui.exportInfoLabel.text == ""
    widget.updateExportState(running=True)
    assert widget.ui.exportDicomSegButton.enabled is False and widget.ui.exportFilesButton.enabled is False
    widget.onExportDicomSeg()
    assert "DICOM-SEG with 2 segment(s) (Liver, Spleen)" in widget.ui.statusLabel.text
    assert len(database.imported) == 2 and not shown["errors"]

    # a failing database: the error's text reaches the user, details go to the log, nothing is left
    current["database"] = FakeDicomDatabase(dict(zip(series.uids, series.files)), fail_import=True)
    before = files_under(tmp_path)
    widget.onExportDicomSeg()
    (text, kwargs), = shown["errors"]
    assert "simulated DICOM database failure" in text and "Nothing was written" in text
    assert "Traceback" in kwargs["detailedText"]
    assert files_under(tmp_path) == before

    # a volume that is not from DICOM: the button is off and the panel says why; the button's handler
    # (reachable from scripts) explains and offers the file export instead
    plain = logic.segment(slicer.util.addVolumeFromArray(np.full((4, 40, 48), -1000, np.int16), name="plain"),
                          ORGANS, samples=SAMPLES, model=tiny_package, device="cpu")
    widget._lastResult = plain
    widget.updateExportState()
    assert widget.ui.exportDicomSegButton.enabled is False and widget.ui.exportFilesButton.enabled is True
    assert "was not loaded from DICOM" in widget.ui.exportInfoLabel.text
    assert widget.ui.exportDicomSegButton.toolTip == widget.ui.exportInfoLabel.text
    widget.onExportDicomSeg()
    assert "not loaded from DICOM" in shown["confirm"][-1] and ".seg.nrrd" in shown["confirm"][-1]
    # Export files...: the folder chosen in the dialog receives .seg.nrrd + NIfTI
    folder = tmp_path / "chosen"
    monkeypatch.setattr(module.qt, "QFileDialog", types.SimpleNamespace(getExistingDirectory=lambda *a: str(folder)),
                        raising=False)
    widget.onExportFiles()
    assert sorted(p.name for p in folder.iterdir()) == ["plain MedDiffSeg.seg.nrrd", "plain MedDiffSeg_labels.nii.gz",
                                                        "plain MedDiffSeg_uncertainty.nii.gz"]
    assert "Written:" in widget.ui.statusLabel.text and len(shown["errors"]) == 1
    # the segmentation removed from the scene: both buttons off
    mrml.scene.RemoveNode(plain.segmentationNode)
    widget.updateExportState()
    assert widget.ui.exportDicomSegButton.enabled is False and widget.ui.exportFilesButton.enabled is False
