"""CLI: ``segment --dicom-seg``, ``export-dicom-seg`` and ``send`` (to a real Orthanc on localhost)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.dicom import PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE, PacsError, read_dicom_seg, send_files
from MedDiffSegLib.errors import InputError
from tinymodels import make_tiny_package

from .conftest import OrthancServer, free_port


@pytest.fixture(scope="module")
def tiny_pkg(tmp_path_factory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("dicom_pkg") / "tiny-guided", "guided").path


@pytest.fixture(scope="module")
def segmented(tiny_pkg, ct3, tmp_path_factory) -> Path:
    """``meddiffseg segment ct-3slice --dicom-seg fractional --save-probabilities`` with a tiny model."""
    out = tmp_path_factory.mktemp("segmented") / "out"
    rc = main(["segment", str(ct3), "--organ", "spleen", "--organ", "liver", "--out", str(out),
               "--model", str(tiny_pkg), "--device", "cpu", "--samples", "2", "--dicom-seg", "fractional",
               "--save-probabilities", "-q"])
    assert rc == 0
    return out


def test_dicom_outputs_get_the_permissions_of_the_nifti_outputs(segmented):
    """Issue #25: the DICOM files were written 0600 (mkstemp), the NIfTI files 0644 (the umask's)."""
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in segmented.iterdir()}
    assert modes["segmentation.dcm"] == modes["uncertainty_pmap.dcm"] == modes["segmentation.nii.gz"] \
        == modes["summary.json"] == 0o666 & ~umask, modes


def _labels_of(seg_file: Path, source) -> np.ndarray:
    return sitk.GetArrayFromImage(read_dicom_seg(seg_file, source).labels)


# -- segment --dicom-seg ----------------------------------------------------------------------------


def test_segment_writes_dicom_outputs(segmented, ct3, dciodvfy):
    files = {p.name for p in segmented.iterdir()}
    assert {"segmentation.nii.gz", "uncertainty.nii.gz", "summary.json", "segmentation.dcm",
            "uncertainty_pmap.dcm", "probability_spleen.nii.gz", "probability_liver.nii.gz"} == files
    summary = json.loads((segmented / "summary.json").read_text())
    assert summary["outputs"]["dicom_seg"] == "segmentation.dcm" and summary["outputs"]["dicom_seg_type"] == "FRACTIONAL"
    assert [o["type"]["meaning"] for o in summary["organs"]] == ["Spleen", "Liver"]
    dciodvfy(segmented / "segmentation.dcm")
    dciodvfy(segmented / "uncertainty_pmap.dcm")

    seg = pydicom.dcmread(segmented / "segmentation.dcm")
    assert seg.SegmentationType == "FRACTIONAL"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen", "Liver"]  # label order = --organ order
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "tiny-guided" and algo.AlgorithmVersion == "0.0.1"

    import highdicom as hd

    from MedDiffSegLib.dicom import load_source_series

    src = load_source_series(ct3)
    uids = [src.datasets[fr.dataset_index].SOPInstanceUID for fr in src.slice_frames]
    stored = hd.seg.segread(str(segmented / "segmentation.dcm")).get_pixels_by_source_instance(
        uids, rescale_fractional=False)
    for s, organ in enumerate(("spleen", "liver")):
        prob = sitk.GetArrayFromImage(sitk.ReadImage(str(segmented / f"probability_{organ}.nii.gz")))
        np.testing.assert_array_equal(stored[..., s], np.round(prob * 255).astype(np.uint8))

    pm = pydicom.dcmread(segmented / "uncertainty_pmap.dcm")
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and pm.StudyInstanceUID == seg.StudyInstanceUID
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(segmented / "uncertainty.nii.gz")))
    for f, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        k = int(round(src.grid.continuous_index([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])[2]))
        np.testing.assert_array_equal(pm.pixel_array[f], unc[k])


def test_segment_binary_dicom_seg_matches_nifti(tiny_pkg, ct3, tmp_path, dciodvfy, capsys):
    out = tmp_path / "out"
    rc = main(["segment", str(ct3), "--organ", "liver", "--out", str(out), "--model", str(tiny_pkg),
               "--device", "cpu", "--samples", "2", "--dicom-seg"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "segmentation.dcm" in printed and "uncertainty_pmap.dcm" in printed
    dciodvfy(out / "segmentation.dcm")
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    assert pydicom.dcmread(out / "segmentation.dcm").SegmentationType == "BINARY"
    assert nifti.any()
    np.testing.assert_array_equal(_labels_of(out / "segmentation.dcm", ct3), nifti)


def test_segment_dicom_seg_needs_a_dicom_folder(tiny_pkg, data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["segment", str(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"), "--organ", "liver",
               "--out", str(out), "--model", str(tiny_pkg), "--device", "cpu", "--dicom-seg"])
    assert rc == InputError.exit_code
    err = capsys.readouterr().err
    assert "DICOM-SEG can only be derived from a DICOM series" in err and "is not a folder" in err
    assert not out.exists()


# -- export-dicom-seg -------------------------------------------------------------------------------


def test_export_cli_uses_summary_for_organs(segmented, ct3, tiny_pkg, tmp_path, dciodvfy, capsys):
    out, pm = tmp_path / "seg.dcm", tmp_path / "pm.dcm"
    rc = main(["export-dicom-seg", "--seg", str(segmented / "segmentation.nii.gz"), "--dicom", str(ct3),
               "--out", str(out), "--uncertainty", str(segmented / "uncertainty.nii.gz"), "--out-pmap", str(pm)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "organs from summary.json" in printed and "segment 1: Spleen" in printed
    dciodvfy(out)
    dciodvfy(pm)
    ds = pydicom.dcmread(out)
    assert ds.SegmentationType == "BINARY"
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in ds.SegmentSequence] == ["Spleen", "Liver"]
    assert ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "tiny-guided"
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(segmented / "segmentation.nii.gz")))
    np.testing.assert_array_equal(_labels_of(out, ct3), nifti)

    # FRACTIONAL from the probability files, organs named explicitly (summary not needed)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(segmented / "segmentation.nii.gz", lonely / "labels.nii.gz")
    frac = tmp_path / "frac.dcm"
    rc = main(["export-dicom-seg", "--seg", str(lonely / "labels.nii.gz"), "--dicom", str(ct3), "--out", str(frac),
               "--organ", "spleen", "--organ", "liver", "--model", str(tiny_pkg), "--probabilities",
               str(segmented / "probability_spleen.nii.gz"), str(segmented / "probability_liver.nii.gz"), "-q"])
    assert rc == 0
    assert pydicom.dcmread(frac).SegmentationType == "FRACTIONAL"
    dciodvfy(frac)


def test_export_cli_errors(segmented, ct3, ct20, tiny_pkg, tmp_path, capsys):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(segmented / "segmentation.nii.gz", lonely / "labels.nii.gz")
    out = tmp_path / "seg.dcm"
    # no summary and no --organ with a two-organ model: ambiguous
    rc = main(["export-dicom-seg", "--seg", str(lonely / "labels.nii.gz"), "--dicom", str(ct3), "--out", str(out),
               "--model", str(tiny_pkg)])
    assert rc == InputError.exit_code and "Pass --organ NAME for each label" in capsys.readouterr().err
    # the wrong series: the geometry mismatch is named
    rc = main(["export-dicom-seg", "--seg", str(segmented / "segmentation.nii.gz"), "--dicom", str(ct20),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == InputError.exit_code and "does not lie on the DICOM series' voxel grid" in err and "size differs" in err
    # --uncertainty without --out-pmap
    rc = main(["export-dicom-seg", "--seg", str(segmented / "segmentation.nii.gz"), "--dicom", str(ct3),
               "--out", str(out), "--uncertainty", str(segmented / "uncertainty.nii.gz")])
    assert rc == 1 and "go together" in capsys.readouterr().err
    # a label beyond the organs given
    rc = main(["export-dicom-seg", "--seg", str(segmented / "segmentation.nii.gz"), "--dicom", str(ct3),
               "--out", str(out), "--organ", "liver"])
    assert rc == InputError.exit_code and "only 1 organ" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lonely"]


# -- send -------------------------------------------------------------------------------------------


def test_send_to_orthanc_and_query_back(segmented, orthanc: OrthancServer, capsys):
    files = [segmented / "segmentation.dcm", segmented / "uncertainty_pmap.dcm"]
    rc = main(["send", *map(str, files), "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
               "--aet", orthanc.AET, "--timeout", "20"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("stored  ") == 2 and "2 instance(s) stored" in out
    for f, sop_class in zip(files, (SEGMENTATION_STORAGE, PARAMETRIC_MAP_STORAGE)):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        tags = orthanc.instance_tags(ds.SOPInstanceUID)
        assert tags is not None, f"{f.name} not found in Orthanc"
        assert tags["SOPClassUID"] == sop_class
        assert tags["StudyInstanceUID"] == ds.StudyInstanceUID and tags["SeriesInstanceUID"] == ds.SeriesInstanceUID


def test_send_reports_each_status_and_fails_on_refused_instance(segmented, orthanc: OrthancServer, tmp_path, capsys):
    """An instance of a SOP class the PACS does not accept is reported as failed; the others are stored."""
    odd = pydicom.dcmread(segmented / "uncertainty_pmap.dcm")
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.999.1"
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    odd.save_as(tmp_path / "odd.dcm")
    seg = segmented / "segmentation.dcm"
    results = send_files([seg, tmp_path / "odd.dcm"], "127.0.0.1", orthanc.dicom_port, orthanc.AET, timeout=20)
    assert [r.stored for r in results] == [True, False]
    assert "does not accept" in results[1].message and results[1].status is None
    assert orthanc.instance_tags(odd.SOPInstanceUID) is None
    rc = main(["send", str(seg), str(tmp_path / "odd.dcm"), "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
               "--aet", orthanc.AET, "--timeout", "20"])
    captured = capsys.readouterr()
    assert rc == PacsError.exit_code
    assert "FAILED" in captured.out and "1 of 2 instance(s) were not stored" in captured.err


def test_send_wrong_called_aet_is_rejected(segmented, orthanc: OrthancServer, capsys):
    """Orthanc answers A-ASSOCIATE-RJ and closes the connection at once; on a loaded machine the close
    can overtake the reject (the client then sees a dropped association, also an error with nothing
    sent). Every attempt must fail cleanly, and the rejection must be reported as such when it arrives."""
    errors = []
    for _ in range(3):
        rc = main(["send", str(segmented / "segmentation.dcm"), "--host", "127.0.0.1", "--port",
                   str(orthanc.dicom_port), "--aet", "NOT_THE_PACS", "--timeout", "10"])
        captured = capsys.readouterr()
        assert rc == PacsError.exit_code and "nothing was sent" in captured.err and "stored" not in captured.out
        errors.append(captured.err)
        if "rejected the association" in captured.err:
            break
    assert "rejected the association" in errors[-1], errors


def test_send_to_closed_port_fails_fast(segmented, capsys):
    port = free_port()  # bound and released: nothing listens there now
    t0 = time.monotonic()
    rc = main(["send", str(segmented / "segmentation.dcm"), "--host", "127.0.0.1", "--port", str(port),
               "--aet", "PACS", "--timeout", "5"])
    elapsed = time.monotonic() - t0
    captured = capsys.readouterr()
    assert rc == PacsError.exit_code and elapsed < 5
    assert "connection refused" in captured.err and "nothing was sent" in captured.err
    assert captured.out == ""


def test_send_to_silent_server_times_out(segmented):
    """A server that accepts TCP but never answers the association request: an error after the timeout."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_ignore():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_ignore, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PacsError, match="did not answer the association request within 2 s") as e:
            send_files([segmented / "segmentation.dcm"], "127.0.0.1", server.getsockname()[1], "PACS", timeout=2)
        elapsed = time.monotonic() - t0
        assert elapsed < 2 * 2 + 3, f"took {elapsed:.1f} s for a 2 s timeout"
        assert "nothing was sent" in str(e.value)
    finally:
        stop.set()
        thread.join(timeout=5)
        for c in held:
            c.close()
        server.close()


def test_send_checks_files_before_connecting(tmp_path, capsys):
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    rc = main(["send", str(not_dicom), "--host", "127.0.0.1", "--port", str(free_port()), "--aet", "PACS"])
    assert rc == InputError.exit_code and "is not a DICOM file" in capsys.readouterr().err
    rc = main(["send", str(tmp_path / "missing.dcm"), "--host", "127.0.0.1", "--port", "104", "--aet", "PACS"])
    assert rc == InputError.exit_code
    rc = main(["send", str(not_dicom), "--host", "127.0.0.1", "--port", "104", "--aet", "A" * 17])
    assert rc == 1 and "not a valid AE title" in capsys.readouterr().err


def test_segment_dicom_seg_refuses_an_empty_result_before_any_output(tiny_pkg, ct3, tmp_path, monkeypatch, capsys):
    from MedDiffSegLib.inference import engine as engine_module

    real = engine_module.segment_volume

    def nothing_found(*args, **kwargs):
        result = real(*args, **kwargs)
        result.labels = result.labels * 0
        return result

    monkeypatch.setattr(engine_module, "segment_volume", nothing_found)
    out = tmp_path / "out"
    rc = main(["segment", str(ct3), "--organ", "liver", "--out", str(out), "--model", str(tiny_pkg),
               "--device", "cpu", "--samples", "2", "--dicom-seg", "-q"])
    assert rc == InputError.exit_code and "segmentation is empty" in capsys.readouterr().err
    assert not out.exists()
