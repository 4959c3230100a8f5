"""DICOM-SEG and Parametric Map writers and the SEG reader, on the real CT series."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedDiffSegLib.dicom import (PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE, Grid, align_to_grid, export_dicom,
                                 export_dicom_seg, export_parametric_map, load_source_series, read_dicom_seg)
from MedDiffSegLib.errors import InputError, ModelError
from MedDiffSegLib.io import read_dicom_series
from MedDiffSegLib.registry.package import Organ

from .conftest import ANATOMY, HEART, KIDNEY_R, LIVER, SPINE, SPLEEN

CT3_ORGANS = [LIVER, SPINE, HEART]
CT20_ORGANS = [LIVER, SPLEEN, KIDNEY_R]
TOTALSEG_CODES = (5, 1, 2)  # TotalSegmentator labels of liver, spleen, kidney_right


# -- shared data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct3_series(ct3):
    return read_dicom_series(ct3)


@pytest.fixture(scope="module")
def ct20_series(ct20):
    return read_dicom_series(ct20)


@pytest.fixture(scope="module")
def ct3_labels(data_dir) -> sitk.Image:
    """dcmqi's labels on the 3-slice CT: 1 liver, 2 spine (3 heart is in heart_seg.nrrd)."""
    return sitk.ReadImage(str(data_dir / "dcmqi" / "liver_spine_seg.nrrd"))


@pytest.fixture(scope="module")
def ct20_labels(data_dir) -> sitk.Image:
    """TotalSegmentator's labels on the 20-slice CT, reduced to liver=1, spleen=2, right kidney=3.

    The file stores the series' grid with the y axis flipped (direction -1, origin at the
    last row): the writer must map it by physical position.
    """
    img = sitk.ReadImage(str(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    out = np.zeros(arr.shape, np.uint8)
    for label, code in enumerate(TOTALSEG_CODES, start=1):
        out[arr == code] = label
    res = sitk.GetImageFromArray(out)
    res.CopyInformation(img)
    return res


def _on_grid(image: sitk.Image, series_image: sitk.Image) -> np.ndarray:
    return align_to_grid(image, Grid.of(series_image), "test image")


def _uncertainty_like(labels: sitk.Image, seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random(sitk.GetArrayViewFromImage(labels).shape) * 0.25).astype(np.float32)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out


def _files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- SEG: validity and round trips -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["ct3", "ct20"])
def test_seg_is_valid_and_round_trips(which, request, tmp_path, dciodvfy):
    folder = request.getfixturevalue(which)
    series_image, files = request.getfixturevalue(f"{which}_series")
    labels = request.getfixturevalue(f"{which}_labels")
    organs = CT3_ORGANS if which == "ct3" else CT20_ORGANS
    out = tmp_path / "seg.dcm"

    result = export_dicom_seg(labels, folder, organs, out, model_name="test-model", model_version="1.2.3",
                              series_description="MedDiffSeg test")
    dciodvfy(out)  # no errors (warnings are allowed: see the report in the issue)

    expected = _on_grid(labels, series_image)
    # our reader
    back = read_dicom_seg(out, folder)
    assert Grid.of(back.labels) == Grid.of(series_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.labels), expected)
    assert [s.number for s in back.segments] == [1, 2, 3]
    assert [s.voxels for s in back.segments] == [int((expected == i).sum()) for i in (1, 2, 3)]
    assert [s.color_rgb for s in back.segments] == [o.color for o in organs]

    # pydicom: the header
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.SeriesDescription == "MedDiffSeg test"
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    src = load_source_series(folder)
    assert ds.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == src.datasets[0].StudyInstanceUID
    assert ds.SOPInstanceUID not in {h.SOPInstanceUID for h in headers}
    assert ds.SeriesInstanceUID != src.datasets[0].SeriesInstanceUID
    assert ds.PatientID == headers[0].PatientID and ds.PatientName == headers[0].PatientName
    for item, organ in zip(ds.SegmentSequence, organs):
        assert item.SegmentLabel == organ.display_name
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == organ.category["code"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == organ.type["code"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("test-model", "1.2.3")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert len(item.RecommendedDisplayCIELabValue) == 3
    # every source instance is referenced
    referenced = {i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in src.datasets}
    assert result.sop_instance_uid == ds.SOPInstanceUID and result.number_of_frames == ds.NumberOfFrames

    # highdicom: frames by referenced source instance (its own mapping, through the UIDs)
    import highdicom as hd

    seg = hd.seg.segread(str(out))
    uids = [src.datasets[fr.dataset_index].SOPInstanceUID for fr in src.slice_frames]  # slice k's instance
    per_instance = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                     skip_overlap_checks=True)
    np.testing.assert_array_equal(per_instance, expected)


@pytest.mark.parametrize("which", ["ct3", "ct20"])
def test_dcmqi_reads_our_seg_identically(which, request, tmp_path, segimage2itkimage):
    folder = request.getfixturevalue(which)
    series_image, _ = request.getfixturevalue(f"{which}_series")
    labels = request.getfixturevalue(f"{which}_labels")
    organs = CT3_ORGANS if which == "ct3" else CT20_ORGANS
    out = tmp_path / "seg.dcm"
    export_dicom_seg(labels, folder, organs, out)
    outdir = tmp_path / "dcmqi"
    outdir.mkdir()
    proc = subprocess.run([segimage2itkimage, "--inputDICOM", str(out), "--outputDirectory", str(outdir), "-t", "nrrd"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = _on_grid(labels, series_image)
    meta = json.loads((outdir / "meta.json").read_text())
    assert sorted(p.name for p in outdir.glob("*.nrrd")) == ["1.nrrd", "2.nrrd", "3.nrrd"]  # empty ones too
    for number in (1, 2, 3):
        img = sitk.ReadImage(str(outdir / f"{number}.nrrd"))
        # dcmqi's grid may cover only the frames present: put it on the series grid by position
        # (voxel centres coincide, so nearest neighbour is exact).
        on_series = sitk.Resample(img, series_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
        got = sitk.GetArrayFromImage(on_series) != 0
        np.testing.assert_array_equal(got, expected == number, err_msg=f"segment {number}")
    attrs = [s[0] for s in meta["segmentAttributes"]]
    assert [a["SegmentedPropertyTypeCodeSequence"]["CodeValue"] for a in attrs] == [o.type["code"] for o in organs]


def test_reads_dcmqi_reference_liver_seg(data_dir, ct3):
    """dcmqi's liver.dcm on the 3-slice CT equals label 1 of liver_spine_seg.nrrd, voxel for voxel."""
    reference = sitk.ReadImage(str(data_dir / "dcmqi" / "liver_spine_seg.nrrd"))
    result = read_dicom_seg(data_dir / "dcmqi" / "liver.dcm", ct3)
    got = sitk.GetArrayFromImage(result.labels)
    want = sitk.GetArrayFromImage(reference) == 1
    assert want.sum() > 1000
    np.testing.assert_array_equal(got == 1, want)
    assert set(np.unique(got)) <= {0, 1}
    assert [(s.number, s.label, s.type["meaning"]) for s in result.segments] == [(1, "Liver", "Liver")]
    assert result.segments[0].voxels == int(want.sum())
    # the SEG's own grid (no source given) gives the same label map here: its frames cover all slices
    own = read_dicom_seg(data_dir / "dcmqi" / "liver.dcm")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(own.labels) == 1, want)
    assert np.allclose(own.labels.GetOrigin(), reference.GetOrigin(), atol=1e-3)


def test_fractional_seg_round_trips(ct3, ct3_series, ct3_labels, tmp_path, dciodvfy, segimage2itkimage):
    series_image, _ = ct3_series
    lab = _on_grid(ct3_labels, series_image)
    rng = np.random.default_rng(1)
    probs = []
    for i in (1, 2):
        p = np.where(lab == i, 0.6 + 0.4 * rng.random(lab.shape), 0.45 * rng.random(lab.shape)).astype(np.float32)
        img = sitk.GetImageFromArray(p)
        img.CopyInformation(series_image)
        probs.append(img)
    out = tmp_path / "frac.dcm"
    labels12 = sitk.GetImageFromArray(np.where(lab <= 2, lab, 0).astype(np.uint8))
    labels12.CopyInformation(series_image)
    export_dicom_seg(labels12, ct3, [LIVER, SPINE], out, fractional_probabilities=probs)
    dciodvfy(out)
    ds = pydicom.dcmread(out)
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    assert ds.MaximumFractionalValue == 255

    import highdicom as hd

    seg = hd.seg.segread(str(out))
    src = load_source_series(ct3)
    uids = [src.datasets[fr.dataset_index].SOPInstanceUID for fr in src.slice_frames]
    stored = seg.get_pixels_by_source_instance(uids, rescale_fractional=False)  # [k, rows, cols, segments]
    for s, img in enumerate(probs):
        want = np.round(sitk.GetArrayFromImage(img) * 255).astype(np.uint8)
        np.testing.assert_array_equal(stored[..., s], want)
    # thresholded at half the maximum by our reader: the labels back
    back = read_dicom_seg(out, ct3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.labels), np.where(lab <= 2, lab, 0))
    # and dcmqi reads the fractional values
    outdir = tmp_path / "dcmqi"
    outdir.mkdir()
    proc = subprocess.run([segimage2itkimage, "--inputDICOM", str(out), "--outputDirectory", str(outdir), "-t", "nrrd"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for s in (1, 2):
        img = sitk.ReadImage(str(outdir / f"{s}.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img),
                                      np.round(sitk.GetArrayFromImage(probs[s - 1]) * 255).astype(np.int64))


def test_flipped_label_map_is_placed_by_position(ct20, ct20_series, ct20_labels, tmp_path):
    """The 20-slice labels are stored with a flipped y axis; a label map whose z axis is flipped too
    (and one resampled to LPS) gives the same SEG content."""
    series_image, _ = ct20_series
    flipped = sitk.Flip(ct20_labels, [False, False, True])  # keeps physical positions
    assert flipped.GetDirection() != ct20_labels.GetDirection()
    a = export_dicom_seg(ct20_labels, ct20, CT20_ORGANS, tmp_path / "a.dcm")
    b = export_dicom_seg(flipped, ct20, CT20_ORGANS, tmp_path / "b.dcm")
    ra = sitk.GetArrayFromImage(read_dicom_seg(a.path, ct20).labels)
    rb = sitk.GetArrayFromImage(read_dicom_seg(b.path, ct20).labels)
    np.testing.assert_array_equal(ra, rb)
    # against the original file by physical position: label of voxel (i, j, k) of the series
    arr = sitk.GetArrayFromImage(ct20_labels)
    for idx in [(100, 200, 0), (300, 250, 7), (260, 330, 19)]:
        point = series_image.TransformIndexToPhysicalPoint(idx)
        i, j, k = ct20_labels.TransformPhysicalPointToIndex(point)
        assert ra[idx[2], idx[1], idx[0]] == arr[k, j, i]
    assert (ra > 0).sum() == (arr > 0).sum() > 1000


def test_source_given_as_unordered_file_list(ct3, ct3_series, ct3_labels, tmp_path):
    series_image, files = ct3_series
    shuffled = [files[1], files[2], files[0]]
    out = export_dicom_seg(ct3_labels, shuffled, CT3_ORGANS, tmp_path / "s.dcm")
    back = read_dicom_seg(out.path, shuffled)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.labels), _on_grid(ct3_labels, series_image))
    # the header-derived grid equals the one read_dicom_series builds
    g = load_source_series(shuffled).grid
    assert g.size == series_image.GetSize()
    assert np.allclose(g.origin, series_image.GetOrigin()) and np.allclose(g.spacing, series_image.GetSpacing())


def test_enhanced_multiframe_source(ct3, ct3_labels, tmp_path, dciodvfy):
    """An enhanced (multi-frame) CT, frames stored head first: frames are matched by position."""
    import warnings

    import highdicom as hd
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        singles = [pydicom.dcmread(f) for f in sorted(ct3.iterdir())]
        mf = LegacyConvertedEnhancedCTImage(singles, series_instance_uid=hd.UID(), series_number=7,
                                            sop_instance_uid=hd.UID(), instance_number=1)
    folder = tmp_path / "mf"
    folder.mkdir()
    mf.save_as(folder / "mf.dcm")
    # From the file: the grid runs feet to head, frame 1 (the highest) is slice 2. From the folder
    # (read_dicom_series/GDCM), the grid may run the other way; both map by position.
    src = load_source_series([folder / "mf.dcm"])
    assert src.is_multiframe and src.frames_to_slices() == [2, 1, 0]
    assert load_source_series(folder).is_multiframe
    seg = export_dicom_seg(ct3_labels, folder, CT3_ORGANS, tmp_path / "seg.dcm")
    pm = export_parametric_map(_uncertainty_like(ct3_labels), folder, tmp_path / "pm.dcm")
    dciodvfy(seg.path)
    dciodvfy(pm.path)
    back = read_dicom_seg(seg.path, [folder / "mf.dcm"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.labels) == 1, sitk.GetArrayFromImage(ct3_labels) == 1)
    ds = pydicom.dcmread(seg.path)
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0] for f in ds.PerFrameFunctionalGroupsSequence]
    assert {r.ReferencedSOPInstanceUID for r in refs} == {mf.SOPInstanceUID}
    assert all("ReferencedFrameNumber" in r for r in refs)


# -- Parametric Map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ct3", "ct20"])
def test_parametric_map_is_valid_and_round_trips(which, request, tmp_path, dciodvfy):
    folder = request.getfixturevalue(which)
    series_image, files = request.getfixturevalue(f"{which}_series")
    labels = request.getfixturevalue(f"{which}_labels")
    unc = _uncertainty_like(labels)
    out = tmp_path / "pm.dcm"
    result = export_parametric_map(unc, folder, out, model_name="test-model", model_version="1.2.3")
    dciodvfy(out)  # no errors (warnings are allowed: see the report in the issue)

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == PARAMETRIC_MAP_STORAGE
    assert ds.FrameOfReferenceUID == pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("1", "UCUM", "no units")
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
    assert ds.NumberOfFrames == len(files) and result.number_of_frames == len(files)
    # each frame's value at its position equals the uncertainty there, exactly (float32)
    import highdicom as hd

    pm = hd.pm.ParametricMap.from_dataset(ds)
    src = load_source_series(folder)
    expected = _on_grid(unc, series_image)
    frames = ds.pixel_array
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = item.PlanePositionSequence[0].ImagePositionPatient
        k = int(round(src.grid.continuous_index([float(v) for v in pos])[2]))
        np.testing.assert_array_equal(frames[f], expected[k])
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == src.datasets[src.slice_frames[k].dataset_index].SOPInstanceUID
    assert pm.SOPInstanceUID == ds.SOPInstanceUID


def test_seg_and_pmap_share_study_and_frame_of_reference(ct20, ct20_labels, tmp_path):
    """The 20-slice series has empty Study/Series/SOP Instance UIDs: they are filled the same way each time."""
    a = export_dicom(ct20_labels, ct20, CT20_ORGANS, tmp_path / "seg.dcm", uncertainty=_uncertainty_like(ct20_labels),
                     pmap_path=tmp_path / "pm.dcm")
    seg, pm = (pydicom.dcmread(x.path) for x in a)
    assert seg.StudyInstanceUID == pm.StudyInstanceUID != ""
    assert seg.FrameOfReferenceUID == pm.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != pm.SeriesInstanceUID
    assert any("StudyInstanceUID is empty" in n for n in a[0].notes)
    assert any("SOPInstanceUID filled from the file meta" in n for n in a[0].notes)
    again = load_source_series(ct20)
    assert again.datasets[0].StudyInstanceUID == seg.StudyInstanceUID  # deterministic
    # the referenced instance UIDs are the files' Media Storage SOP Instance UIDs
    metas = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in again.files}
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == metas


# -- bad input --------------------------------------------------------------------------------------


def _shifted(img: sitk.Image, **changes) -> sitk.Image:
    out = sitk.Image(img)
    if "origin" in changes:
        out.SetOrigin(changes["origin"])
    if "spacing" in changes:
        out.SetSpacing(changes["spacing"])
    if "direction" in changes:
        out.SetDirection(changes["direction"])
    return out


def test_geometry_mismatch_names_what_differs(ct3, ct3_labels, tmp_path):
    out = tmp_path / "seg.dcm"
    o = ct3_labels.GetOrigin()
    cases = {
        "origin differs": _shifted(ct3_labels, origin=(o[0] + 2.0, o[1], o[2])),
        "spacing differs": _shifted(ct3_labels, spacing=(0.9, 0.9, 1.0)),
        "direction differs": _shifted(ct3_labels, direction=(0.8, 0.6, 0, -0.6, 0.8, 0, 0, 0, 1)),
        "size differs": ct3_labels[:, :, :2],
    }
    for text, img in cases.items():
        with pytest.raises(InputError, match=text):
            export_dicom_seg(img, ct3, CT3_ORGANS, out)
        assert not out.exists()
    # several differences are all named
    with pytest.raises(InputError) as e:
        export_dicom_seg(_shifted(ct3_labels[:, :, :2], spacing=(0.5, 0.5, 1.0)), ct3, CT3_ORGANS, out)
    assert "size differs" in str(e.value) and "spacing differs" in str(e.value)
    # a tiny float round-off (as a NIfTI stores it) is not a difference
    tiny = _shifted(ct3_labels, origin=(o[0] + 1e-5, o[1] - 1e-5, o[2]))
    export_dicom_seg(tiny, ct3, CT3_ORGANS, out)
    assert out.exists()


def test_folder_with_several_series_is_refused(ct3, ct3_labels, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    other_series = pydicom.uid.generate_uid()
    for f in ct3.iterdir():
        shutil.copy(f, folder / f.name)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = other_series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"other-{f.name}")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        export_dicom_seg(ct3_labels, folder, CT3_ORGANS, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def _copy_series(ct3: Path, dest: Path, edit) -> Path:
    dest.mkdir()
    for f in sorted(ct3.iterdir()):
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(dest / f.name)
    return dest


def test_missing_type1_attributes(ct3, ct3_labels, tmp_path, dciodvfy):
    # Empty SOP Instance UIDs and no Study Instance UID: filled, and the result is still valid.
    def blank_uids(ds):
        ds.SOPInstanceUID = ""
        del ds.StudyInstanceUID

    folder = _copy_series(ct3, tmp_path / "blank", blank_uids)
    result = export_dicom_seg(ct3_labels, folder, CT3_ORGANS, tmp_path / "seg.dcm")
    dciodvfy(result.path)
    assert any("SOPInstanceUID filled" in n for n in result.notes)
    assert any("StudyInstanceUID is empty" in n for n in result.notes)
    back = read_dicom_seg(result.path, folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.labels), sitk.GetArrayFromImage(ct3_labels))

    # No Frame of Reference UID: cannot be invented.
    def no_for(ds):
        del ds.FrameOfReferenceUID

    folder = _copy_series(ct3, tmp_path / "nofor", no_for)
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        export_dicom_seg(ct3_labels, folder, CT3_ORGANS, tmp_path / "nofor.dcm")
    assert not (tmp_path / "nofor.dcm").exists()

    # No SOP Instance UID anywhere (neither data set nor file meta).
    files = sorted(ct3.iterdir())
    folder = tmp_path / "nosop"
    folder.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(folder / f.name, enforce_file_format=False)
    with pytest.raises(InputError, match="no SOPInstanceUID"):
        export_dicom_seg(ct3_labels, [str(p) for p in sorted(folder.iterdir())], CT3_ORGANS, tmp_path / "nosop.dcm")

    # No Image Position (Patient) in one file: refused (the frame cannot be placed).
    folder = tmp_path / "noipp"
    folder.mkdir()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i == 1:
            del ds.ImagePositionPatient
        ds.save_as(folder / f.name)
    with pytest.raises(InputError, match="Image Position"):
        export_dicom_seg(ct3_labels, [str(p) for p in sorted(folder.iterdir())], CT3_ORGANS, tmp_path / "noipp.dcm")


def test_empty_segmentation(ct3, ct3_labels, tmp_path, dciodvfy):
    empty = sitk.Image(ct3_labels.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct3_labels)
    out = tmp_path / "seg.dcm"
    with pytest.raises(InputError, match="empty"):
        export_dicom_seg(empty, ct3, CT3_ORGANS, out)
    assert _files_in(tmp_path) == set()
    result = export_dicom_seg(empty, ct3, CT3_ORGANS, out, allow_empty=True)
    dciodvfy(out)
    assert any("empty" in n for n in result.notes)
    back = read_dicom_seg(out, ct3)
    assert not sitk.GetArrayFromImage(back.labels).any()
    assert [s.voxels for s in back.segments] == [0, 0, 0]


def test_partly_empty_segments_keep_their_numbers(ct3, ct3_series, ct3_labels, tmp_path, dciodvfy):
    """Label 2 absent: segment 2 is still described, so segment numbers stay the labels."""
    arr = sitk.GetArrayFromImage(ct3_labels)
    only_liver_and_3 = np.where(arr == 1, 1, 0).astype(np.uint8)
    only_liver_and_3[1, 10:20, 10:20] = 3
    img = sitk.GetImageFromArray(only_liver_and_3)
    img.CopyInformation(ct3_labels)
    result = export_dicom_seg(img, ct3, CT3_ORGANS, tmp_path / "seg.dcm")
    dciodvfy(result.path)
    assert [s["voxels"] for s in result.segments] == [int((arr == 1).sum()), 0, 100]
    assert any("segment 2 (Spine) is empty" in n for n in result.notes)
    back = read_dicom_seg(result.path, ct3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.labels), only_liver_and_3)


def test_bad_labels_and_organs(ct3, ct3_labels, tmp_path):
    out = tmp_path / "seg.dcm"
    with pytest.raises(InputError, match=r"label\(s\) \[2\] but only 1 organ"):
        export_dicom_seg(ct3_labels, ct3, [LIVER], out)
    floats = sitk.Cast(ct3_labels, sitk.sitkFloat32) * 0.5
    with pytest.raises(InputError, match="fractional values"):
        export_dicom_seg(floats, ct3, CT3_ORGANS, out)
    bad = Organ("x", "X", (1, 2, 3), ANATOMY, {"code": "", "scheme": "SCT", "meaning": "X"})
    with pytest.raises(ModelError, match="empty code"):
        export_dicom_seg(ct3_labels, ct3, [LIVER, bad], out)
    with pytest.raises(InputError, match="probabilities must lie in"):
        p = sitk.Cast(ct3_labels, sitk.sitkFloat32) * 2.0
        export_dicom_seg(ct3_labels, ct3, [LIVER, SPINE], out, fractional_probabilities=[p, p])
    assert not out.exists()


def test_failed_write_leaves_nothing_and_keeps_existing_file(ct3, ct3_labels, tmp_path):
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"previous")
    wrong = ct3_labels[:, :, :2]
    with pytest.raises(InputError):
        export_dicom(wrong, ct3, CT3_ORGANS, out, uncertainty=_uncertainty_like(ct3_labels), pmap_path=tmp_path / "pm.dcm")
    assert out.read_bytes() == b"previous" and _files_in(tmp_path) == {"seg.dcm"}
    # the Parametric Map fails (wrong geometry) after the SEG was fine: neither is written
    with pytest.raises(InputError, match="uncertainty map"):
        export_dicom(ct3_labels, ct3, CT3_ORGANS, tmp_path / "new.dcm", uncertainty=_uncertainty_like(wrong),
                     pmap_path=tmp_path / "pm.dcm")
    assert _files_in(tmp_path) == {"seg.dcm"}


def test_reader_rejects_non_seg_and_off_grid_frames(ct3, ct20, data_dir):
    with pytest.raises(InputError, match="not a DICOM Segmentation"):
        read_dicom_seg(next(ct3.iterdir()))
    with pytest.raises(InputError, match="does not lie on a slice|pixels"):
        read_dicom_seg(data_dir / "dcmqi" / "liver.dcm", ct20)
