"""Modality in the Slicer module: the volume's modality (DICOM tag through the database, else the voxels),
the models offered for it, the default model per modality, refusing a mismatch before anything is
added to the scene (in process, and before a worker starts), and the worker's own check.

Real MRML (slicer-core) with the example CT and MR loaded through storage nodes, a real DICOM CT
series, and a copy of a real CT series whose Modality tag says MR.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from MedDiffSegLib.errors import ModalityMismatchError
from MedDiffSegLib.registry import DEFAULT_MODELS, store
from MedDiffSegLogicLib import geometry
from MedDiffSegLogicLib import modality as modalityLib
from MedDiffSegLogicLib.process import workerCommand
from MedDiffSegLogicLib.segmentation import BackgroundSegmentation, SegmentOptions
from slicer_harness import MODULE_DIR, ORGANS, assert_scene_unchanged, load_through_storage_node, scene_state

REPO = Path(__file__).resolve().parents[2]


class FakeDicomDatabase:
    """Slicer's DICOM database as the module uses it: SOP Instance UID -> file."""

    def __init__(self, files_by_uid: dict[str, str]):
        self.files = dict(files_by_uid)

    def fileForInstance(self, uid: str) -> str:
        return self.files.get(uid, "")


def _uid(path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.get("SOPInstanceUID", "") or ds.file_meta.MediaStorageSOPInstanceUID)


def dicom_node(slicer, scene, folder: Path, name: str):
    """The series as Slicer's DICOM plugin leaves it: a volume with ``DICOM.instanceUIDs``, and a database."""
    from MedDiffSegLib.io.volume import read_dicom_series

    image, files = read_dicom_series(folder)
    node = geometry.volumeNodeFromImage(image, name, scene)
    uids = [_uid(f) for f in files]
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return node, FakeDicomDatabase(dict(zip(uids, files)))


@pytest.fixture(scope="session")
def mr_tagged_series(data_dir, tmp_path_factory) -> Path:
    """dcmqi's real 3-slice CT, its Modality tag changed to MR (the voxels are still HU)."""
    folder = tmp_path_factory.mktemp("mr_tagged")
    for src in sorted((data_dir / "dcmqi" / "ct-3slice").iterdir()):
        ds = pydicom.dcmread(src)
        ds.Modality = "MR"
        ds.save_as(folder / src.name)
    return folder


@pytest.fixture(scope="session")
def tiny_mr(tmp_path_factory):
    from tinymodels import make_tiny_package

    return make_tiny_package(tmp_path_factory.mktemp("slicer_tiny_mr") / "tiny-mr", "guided", modality="MR",
                             name="tiny-mr", spacing=(12.0, 12.0), steps=1, samples=2)


@pytest.fixture
def mr_node(mrml, slicer, data_dir):
    return load_through_storage_node(slicer, mrml.scene, data_dir / "totalsegmentator" / "example_mr_sm.nii.gz", "example_mr")


@pytest.fixture
def builtin_defaults(tmp_path, monkeypatch, tiny_package, tiny_mr):
    """A built-in folder holding the tiny CT and MR packages as abdomen-ct and abdomen-mr."""
    folder = tmp_path / "builtin"
    folder.mkdir()
    for pkg, name in ((tiny_package, DEFAULT_MODELS["CT"]), (tiny_mr, DEFAULT_MODELS["MR"])):
        dest = shutil.copytree(pkg.path, folder / name)
        meta = json.loads((dest / "model.json").read_text())
        meta["name"] = name
        (dest / "model.json").write_text(json.dumps(meta))
    monkeypatch.setattr(store, "BUILTIN_MODELS_DIR", folder)
    return folder


# -- the volume's modality ------------------------------------------------------------------------------------


def test_volume_modality_from_the_voxels(mrml, slicer, module, ct_node, mr_node, data_dir):
    logic = module.MedDiffSegLogic()
    ct = logic.volumeModality(ct_node)
    assert (ct.modality, ct.source) == ("CT", "intensities") and ct.hu.plausible
    mr = logic.volumeModality(mr_node)
    assert (mr.modality, mr.source) == ("MR", "intensities") and not mr.hu.plausible
    assert mr.text() == "MR (intensities not in Hounsfield units)"
    chaos = load_through_storage_node(slicer, mrml.scene, data_dir / "chaos_mr" / "imagesTr" / "chaos_t2_05.nii.gz", "chaos")
    assert logic.volumeModality(chaos).modality == "MR"
    btcv = load_through_storage_node(slicer, mrml.scene, data_dir / "btcv" / "imagesTr" / "btcv_0039.nii.gz", "btcv")
    assert logic.volumeModality(btcv).modality == "CT"  # clipped to [-125, 275] HU, still a CT
    blank = slicer.util.addVolumeFromArray(np.zeros((3, 8, 8), np.int16), name="blank")
    assert logic.volumeModality(blank).modality is None  # one value: cannot tell, nothing is filtered or refused


def test_volume_modality_from_the_dicom_tag(mrml, slicer, module, data_dir, mr_tagged_series):
    logic = module.MedDiffSegLogic()
    ct_node, ct_db = dicom_node(slicer, mrml.scene, data_dir / "totalsegmentator" / "example_ct_dicom", "ct dicom")
    found = logic.volumeModality(ct_node, ct_db)
    assert (found.modality, found.source, found.dicomTag) == ("CT", "dicom", "CT") and found.hu.plausible is True
    assert found.text() == "CT (DICOM Modality)" and found.declaredForWorker() == "CT"
    assert found.contradictingText() == ""
    # the tag names the modality; the voxels (HU here) are checked against it
    mr_node, mr_db = dicom_node(slicer, mrml.scene, mr_tagged_series, "mr-tagged")
    tagged = logic.volumeModality(mr_node, mr_db)
    assert (tagged.modality, tagged.source) == ("MR", "dicom") and tagged.hu.plausible is True
    assert tagged.contradictingText() == ("this volume is tagged MR in DICOM, but its intensities look like a CT in "
                                          "Hounsfield units: if it is a CT, choose a CT model.")
    assert logic.volumeModality(mr_node).source == "intensities"  # no DICOM database in this process
    fallback = modalityLib.volumeModality(mr_node, FakeDicomDatabase({}))  # files no longer in the database
    assert (fallback.modality, fallback.source) == ("CT", "intensities") and fallback.declaredForWorker() is None


# -- the models offered, the default, the warning ----------------------------------------------------------------


def test_models_offered_for_the_volume_and_the_default_per_modality(mrml, slicer, module, ct_node, mr_node, tiny_package,
                                                                   tiny_mr):
    logic = module.MedDiffSegLogic()
    packages = [tiny_package, tiny_mr]
    volume, fitting, others = logic.modelsForVolume(ct_node, packages)
    assert volume.modality == "CT" and fitting == [tiny_package] and others == [tiny_mr]
    volume, fitting, others = logic.modelsForVolume(mr_node, packages)
    assert volume.modality == "MR" and fitting == [tiny_mr] and others == [tiny_package]
    assert logic.modelsForVolume(None, packages) == (None, packages, [])
    assert logic.defaultModelName("MR", packages) == "tiny-mr"  # the only MR model
    assert logic.defaultModelName("CT", packages) == tiny_package.name
    assert logic.defaultModelName("MR", [tiny_package]) == ""
    assert logic.modelModality(tiny_mr) == "MR" and logic.modelModality(tiny_package.path) == "CT"
    assert logic.modalityWarning(ct_node, tiny_package) == ""
    warning = logic.modalityWarning(mr_node, tiny_package)
    assert warning.startswith(f"{tiny_package.name} is a CT model, but this volume is MR") and "choose an MR model" in warning
    assert "is an MR model, but this volume is CT" in logic.modalityWarning(ct_node, tiny_mr)
    blank = slicer.util.addVolumeFromArray(np.zeros((3, 8, 8), np.int16), name="blank")
    assert logic.modalityWarning(blank, tiny_mr) == logic.modalityWarning(blank, tiny_package) == ""
    assert logic.modelsForVolume(blank, packages)[1:] == (packages, [])


def test_default_model_name_follows_the_library_rule(mrml, module, builtin_defaults):
    logic = module.MedDiffSegLogic()
    assert logic.defaultModelName("CT") == DEFAULT_MODELS["CT"]
    assert logic.defaultModelName("MR") == DEFAULT_MODELS["MR"]


# -- a run refuses a mismatch before touching the scene ----------------------------------------------------------


def test_segment_refuses_a_ct_model_on_an_mr_and_runs_when_allowed(mrml, module, mr_node, tiny_package):
    logic = module.MedDiffSegLogic()
    before = scene_state(mrml, mr_node)
    with pytest.raises(ModalityMismatchError, match="is a CT model but the input's intensities are implausible"):
        logic.segment(mr_node, ORGANS, samples=1, model=tiny_package, device="cpu")
    assert_scene_unchanged(before, mrml, mr_node)
    result = logic.segment(mr_node, ORGANS, samples=1, model=tiny_package, device="cpu", allowModalityMismatch=True)
    check = result.summary["modality_check"]
    assert check["mismatch"] is True and check["overridden"] is True and check["model_modality"] == "CT"
    assert result.summary["model"]["modality"] == "CT"


def test_segment_refuses_a_dicom_series_tagged_mr_whose_voxels_are_hu(mrml, slicer, module, mr_tagged_series,
                                                                       tiny_package, tiny_mr):
    """A CT tagged MR: the CT model refuses the tag, the MR model the voxels (issue #25); the panel warns first."""
    node, db = dicom_node(slicer, mrml.scene, mr_tagged_series, "mr-tagged")
    logic = module.MedDiffSegLogic()
    before = scene_state(mrml, node)
    with pytest.raises(ModalityMismatchError, match=r"the input is MR \(its DICOM Modality tag\)"):
        logic.segment(node, ORGANS, samples=1, model=tiny_package, device="cpu", database=db)
    with pytest.raises(ModalityMismatchError, match=r"the input is MR \(its DICOM Modality tag\), but its intensities "
                                                    r"look like a CT in Hounsfield units"):
        logic.segment(node, ORGANS, samples=1, model=tiny_mr, device="cpu", database=db)
    assert_scene_unchanged(before, mrml, node)
    volume = logic.volumeModality(node, db)
    assert logic.modalityWarning(node, tiny_mr, volume).startswith("This volume is tagged MR in DICOM, but its intensities")
    assert "choose an MR model" in logic.modalityWarning(node, tiny_package, volume)
    result = logic.segment(node, ORGANS, samples=1, model=tiny_mr, device="cpu", database=db, allowModalityMismatch=True)
    assert result.summary["input"] == {"modality": "MR", "modality_source": "dicom"}
    check = result.summary["modality_check"]
    assert check["mismatch"] is True and check["overridden"] is True and check["hu_plausible"] is True


def test_segment_without_a_model_uses_the_default_for_the_volume(mrml, slicer, module, ct_node, mr_node, builtin_defaults,
                                                                 mr_tagged_series):
    logic = module.MedDiffSegLogic()
    assert logic.segment(mr_node, ["liver"], samples=1, device="cpu").summary["model"]["name"] == DEFAULT_MODELS["MR"]
    assert logic.segment(ct_node, ["liver"], samples=1, device="cpu").summary["model"]["name"] == DEFAULT_MODELS["CT"]
    node, db = dicom_node(slicer, mrml.scene, mr_tagged_series, "mr-tagged")
    with pytest.raises(ModalityMismatchError, match=f"installed CT models: {DEFAULT_MODELS['CT']} \\(the default\\)"):
        logic.segment(node, ["liver"], samples=1, device="cpu", database=db)  # its voxels are HU
    result = logic.segment(node, ["liver"], samples=1, device="cpu", database=db, allowModalityMismatch=True)
    assert result.summary["model"]["name"] == DEFAULT_MODELS["MR"]  # the default for its tag


class RecordingRunner:
    """A ProcessRunner that records the worker's request instead of starting a process."""

    pid = None

    def __init__(self):
        self.request = None

    def start(self, args, env=None, cwd=None):
        self.request = json.loads(Path(args[args.index("--request") + 1]).read_text())

    def readLines(self):
        return []

    def errorText(self):
        return ""

    def poll(self):
        return None

    def wait(self, timeout=None):
        return None

    def terminate(self, grace=1.0):
        pass


def test_background_run_checks_before_the_worker_starts_and_declares_the_dicom_modality(
        mrml, slicer, module, mr_tagged_series, tiny_package, tiny_mr, tmp_path):
    node, db = dicom_node(slicer, mrml.scene, mr_tagged_series, "mr-tagged")
    runner = RecordingRunner()
    job = BackgroundSegmentation(node, SegmentOptions(ORGANS, model=tiny_package, samples=1), runner=runner,
                                 tempRoot=str(tmp_path), database=db)
    with pytest.raises(ModalityMismatchError, match="--allow-modality-mismatch"):
        job.start()
    assert runner.request is None and list(tmp_path.iterdir()) == []
    job = BackgroundSegmentation(node, SegmentOptions(ORGANS, model=tiny_mr, samples=1), runner=runner,
                                 tempRoot=str(tmp_path), database=db)
    with pytest.raises(ModalityMismatchError, match="its intensities look like a CT"):  # the tag against the voxels
        job.start()
    assert runner.request is None and list(tmp_path.iterdir()) == []
    job = BackgroundSegmentation(node, SegmentOptions(ORGANS, model=tiny_mr, samples=1, allowModalityMismatch=True),
                                 runner=runner, tempRoot=str(tmp_path), database=db)
    job.start()
    assert runner.request["modality"] == "MR" and runner.request["allow_modality_mismatch"] is True
    job.cancel()
    job = BackgroundSegmentation(node, SegmentOptions(ORGANS, model=tiny_package, samples=1, allowModalityMismatch=True),
                                 runner=runner, tempRoot=str(tmp_path), database=db)
    job.start()
    assert runner.request["modality"] == "MR" and runner.request["allow_modality_mismatch"] is True
    job.cancel()
    assert list(tmp_path.iterdir()) == []


def test_the_worker_checks_the_declared_modality(tmp_path, data_dir, tiny_package):
    """The worker process refuses a CT model on a declared MR (exit 3) and runs it when allowed."""
    request = {"input": str(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"), "out_dir": str(tmp_path / "out"),
               "organs": ["liver"], "model": str(tiny_package.path), "samples": 1, "steps": 1, "device": "cpu",
               "modality": "MR"}
    events, code = _run_worker(request, tmp_path)
    assert code == 3 and events[-1]["kind"] == "ModalityMismatchError"
    assert "the input is MR (--modality)" in events[-1]["message"] and not (tmp_path / "out").exists()
    events, code = _run_worker({**request, "allow_modality_mismatch": True}, tmp_path)
    assert code == 0, events[-1]
    summary = events[-1]["summary"]
    assert summary["input"]["modality"] == "MR" and summary["input"]["modality_source"] == "declared"
    assert summary["modality_check"]["overridden"] is True


def _run_worker(request, tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    proc = subprocess.run(workerCommand(str(path), sys.executable), capture_output=True, text=True, timeout=300)
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()], proc.returncode


# -- no torch -----------------------------------------------------------------------------------------------------


def test_modality_helpers_import_no_torch(tiny_mr):
    """The panel reads package and volume modality without importing torch (it must not load at setup)."""
    code = (f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); "
            "import numpy as np; from MedDiffSegLogicLib import modality as m; "
            f"assert m.packageModality({str(tiny_mr.path)!r}) == 'MR'; "
            "assert m.hu_plausibility(np.array([-1000, 40] * 50)).dark_fraction == 0.5; "
            "assert m.dicom_modality('no-such-file.dcm') == ''; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
