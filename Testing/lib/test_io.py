"""Volume I/O: real-data round trips, DICOM series, every rejected input, atomic writes."""

from __future__ import annotations

import functools
import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.errors import InputError, OutputError
from MedDiffSegLib.io import (CanonicalView, array_view, image_from_array, read_dicom_series, read_volume,
                              write_image_atomic)


def _data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


CT_DICOM = "totalsegmentator/example_ct_dicom"
CT3_DICOM = "dcmqi/ct-3slice"
REAL_VOLUMES = (
    sorted(str(p.relative_to(_data_root())) for p in (_data_root() / "totalsegmentator").glob("*.nii.gz"))
    + sorted(str(p.relative_to(_data_root())) for p in (_data_root() / "dcmqi").glob("*.nrrd"))
    + [CT_DICOM, CT3_DICOM]
)
EXTENSIONS = (".nii.gz", ".nrrd", ".mha")


@functools.lru_cache(maxsize=4)
def _read_cached(path: str) -> sitk.Image:
    """Each real volume is read once for its three output formats (tests never modify it)."""
    return read_volume(path)


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol_mm: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol_mm, rtol=0)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol_mm, rtol=0)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6, rtol=0)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- real data round trips ------------------------------------------------------------------
def test_real_volume_list_is_complete(data_dir: Path) -> None:
    assert len([v for v in REAL_VOLUMES if v.startswith("totalsegmentator/")]) >= 11
    assert "dcmqi/liver_spine_seg.nrrd" in REAL_VOLUMES and "dcmqi/heart_seg.nrrd" in REAL_VOLUMES


@pytest.mark.parametrize("extension", EXTENSIONS)
@pytest.mark.parametrize("relative", REAL_VOLUMES)
def test_real_volume_round_trip(data_dir: Path, tmp_path: Path, relative: str, extension: str) -> None:
    original = _read_cached(str(data_dir / relative))
    assert original.GetDimension() == 3 and original.GetNumberOfComponentsPerPixel() == 1
    assert original.GetPixelID() not in (sitk.sitkFloat64,), "read_volume must not convert to float64"

    target = tmp_path / f"volume{extension}"
    assert write_image_atomic(original, target) == target
    assert _listing(tmp_path) == [target.name]  # no temporary left behind

    back = read_volume(target)
    _assert_same_geometry(back, original)
    assert back.GetPixelID() == original.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(original))


def test_pixel_types_kept_as_stored(data_dir: Path) -> None:
    ts = data_dir / "totalsegmentator"
    assert read_volume(ts / "example_ct.nii.gz").GetPixelID() == sitk.sitkInt32
    assert read_volume(ts / "example_ct_sm.nii.gz").GetPixelID() == sitk.sitkInt16
    assert read_volume(ts / "example_seg.nii.gz").GetPixelID() == sitk.sitkUInt8
    assert _read_cached(str(data_dir / CT_DICOM)).GetPixelID() == sitk.sitkInt16


# ---- DICOM ------------------------------------------------------------------------------------
def test_dicom_series_with_empty_series_uid_reads(data_dir: Path) -> None:
    folder = data_dir / CT_DICOM
    assert sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) == ("",)  # what makes this series special
    image, files = read_dicom_series(folder)
    assert image.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert len(files) == 20 and len(set(files)) == 20
    assert all(Path(f).parent == folder for f in files)


@pytest.mark.parametrize("relative", [CT_DICOM, CT3_DICOM])
def test_dicom_file_names_are_in_slice_order(data_dir: Path, relative: str) -> None:
    image, files = read_dicom_series(data_dir / relative)
    assert len(files) == image.GetSize()[2]
    array = sitk.GetArrayViewFromImage(image)
    for k, name in enumerate(files):
        single = sitk.ReadImage(name)
        np.testing.assert_allclose(single.GetOrigin(), image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-3)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(single)[0], array[k])


def test_dicom_series_matches_its_label_map_physically(data_dir: Path) -> None:
    """``example_seg_dicom.nii.gz`` stores the same grid with y flipped and another origin."""
    ct = _read_cached(str(data_dir / CT_DICOM))
    seg = read_volume(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz")
    assert ct.GetSize() == seg.GetSize()
    assert abs(ct.GetOrigin()[1] - seg.GetOrigin()[1]) > 100  # the files really differ...
    assert ct.GetDirection()[4] == -seg.GetDirection()[4]

    ct_view, seg_view = CanonicalView.from_image(ct), CanonicalView.from_image(seg)
    ct_canon, seg_canon = ct_view.canonical_image(ct), seg_view.canonical_image(seg)
    _assert_same_geometry(ct_canon, seg_canon)  # ...but describe one physical grid

    # every corner voxel of the label map sits on a voxel centre of the CT
    for index in [(0, 0, 0), (511, 0, 0), (0, 511, 0), (0, 0, 19), (511, 511, 19), (100, 200, 7)]:
        point = seg.TransformIndexToPhysicalPoint(index)
        ct_index = ct.TransformPhysicalPointToContinuousIndex(point)
        np.testing.assert_allclose(ct_index, np.round(ct_index), atol=1e-4)
    # y is mirrored: label row 0 is CT row 511
    assert ct.TransformPhysicalPointToIndex(seg.TransformIndexToPhysicalPoint((3, 0, 5))) == (3, 511, 5)

    # and anatomy agrees: labelled voxels are tissue (HU > -300) once aligned, far less so if not
    hu = ct_view.to_canonical(sitk.GetArrayViewFromImage(ct))
    labels = seg_view.to_canonical(sitk.GetArrayViewFromImage(seg))
    aligned = (hu[labels > 0] > -300).mean()
    naive = (sitk.GetArrayViewFromImage(ct)[sitk.GetArrayViewFromImage(seg) > 0] > -300).mean()
    assert aligned > 0.95 and naive < aligned - 0.1, (aligned, naive)


def _write_dicom_slice(path: Path, slice3d: sitk.Image, series_uid: str, number: int, modality: str = "MR") -> None:
    """Write one single-slice 3D image as a DICOM file of the given series (GDCM fills the rest)."""
    d = slice3d.GetDirection()
    tags = {
        "0008|0060": modality,
        "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "0008|0018": f"{series_uid}.{number}",
        "0008|103e": "synthetic test series",
        "0020|000d": f"{series_uid}.0",
        "0020|000e": series_uid,
        "0020|0013": str(number),
        "0020|0032": "\\".join(f"{v:.6f}" for v in slice3d.GetOrigin()),
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
    }
    for key, value in tags.items():
        slice3d.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(slice3d)


SYNTHETIC_UID = "1.2.826.0.1.3680043.2.1125.42"


@pytest.fixture
def synthetic_volume() -> sitk.Image:
    rng = np.random.default_rng(7)
    image = sitk.GetImageFromArray(rng.integers(-500, 1500, size=(6, 7, 8), dtype=np.int16))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    a = math.radians(20)  # oblique: rotated 20° about x
    image.SetDirection((1, 0, 0, 0, math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a)))
    return image


@pytest.fixture
def synthetic_series(tmp_path: Path, synthetic_volume: sitk.Image) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    # file names in reverse slice order: the reader must order by position, not by name
    n = synthetic_volume.GetSize()[2]
    for k in range(n):
        _write_dicom_slice(folder / f"{n - k:03d}.dcm", synthetic_volume[:, :, k : k + 1], SYNTHETIC_UID, k + 1)
    return folder


def test_synthetic_oblique_series_reads_exactly(synthetic_series: Path, synthetic_volume: sitk.Image) -> None:
    image, files = read_dicom_series(synthetic_series)
    _assert_same_geometry(image, synthetic_volume, tol_mm=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(synthetic_volume))
    assert [Path(f).name for f in files] == [f"{6 - k:03d}.dcm" for k in range(6)]
    assert read_volume(synthetic_series).GetSize() == (8, 7, 6)


def test_slice_order_does_not_depend_on_gdcm_sorting(
    synthetic_series: Path, synthetic_volume: sitk.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDCM falls back to other orders when it cannot sort by position; we sort ourselves."""
    found = sitk.ImageSeriesReader.GetGDCMSeriesFileNames

    def shuffled(*args, **kwargs):
        names = list(found(*args, **kwargs))
        return tuple(names[3:] + names[:3][::-1])

    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesFileNames", staticmethod(shuffled))
    image, files = read_dicom_series(synthetic_series)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(synthetic_volume))
    _assert_same_geometry(image, synthetic_volume, tol_mm=1e-5)
    assert [Path(f).name for f in files] == [f"{6 - k:03d}.dcm" for k in range(6)]


def test_series_with_slices_of_different_orientation(synthetic_series: Path, synthetic_volume: sitk.Image) -> None:
    odd = synthetic_volume[:, :, 3:4]
    odd.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    _write_dicom_slice(synthetic_series / "003.dcm", odd, SYNTHETIC_UID, 4)
    with pytest.raises(InputError, match="different orientations") as info:
        read_volume(synthetic_series)
    assert str(synthetic_series) in str(info.value) and "1 of 6" in str(info.value)


def test_series_with_slices_of_different_size(synthetic_series: Path, synthetic_volume: sitk.Image) -> None:
    big = sitk.Image([10, 7, 1], sitk.sitkInt16)
    reference = synthetic_volume[:, :, 3:4]
    big.SetOrigin(reference.GetOrigin())
    big.SetSpacing(reference.GetSpacing())
    big.SetDirection(reference.GetDirection())
    _write_dicom_slice(synthetic_series / "003.dcm", big, SYNTHETIC_UID, 4)
    with pytest.raises(InputError, match="different sizes") as info:
        read_volume(synthetic_series)
    assert "8×7 (5 files)" in str(info.value) and "10×7 (1 files)" in str(info.value)


def test_series_with_a_missing_slice(synthetic_series: Path) -> None:
    (synthetic_series / "003.dcm").unlink()
    with pytest.raises(InputError, match="uneven slice spacing.*missing"):
        read_volume(synthetic_series)


def test_series_with_duplicate_slices(synthetic_series: Path, synthetic_volume: sitk.Image) -> None:
    _write_dicom_slice(synthetic_series / "extra.dcm", synthetic_volume[:, :, 2:3], SYNTHETIC_UID, 99)
    with pytest.raises(InputError, match="same position"):
        read_volume(synthetic_series)


def test_series_with_gantry_tilt(tmp_path: Path, synthetic_volume: sitk.Image) -> None:
    folder = tmp_path / "tilted"
    folder.mkdir()
    for k in range(synthetic_volume.GetSize()[2]):
        s = synthetic_volume[:, :, k : k + 1]
        x, y, z = s.GetOrigin()
        s.SetOrigin((x + 1.5 * k, y, z))  # each slice shifted sideways: a sheared stack
        _write_dicom_slice(folder / f"{k:03d}.dcm", s, SYNTHETIC_UID, k + 1)
    with pytest.raises(InputError, match="not stacked along their normal"):
        read_volume(folder)


def test_series_with_a_single_slice(tmp_path: Path, synthetic_volume: sitk.Image) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    _write_dicom_slice(folder / "only.dcm", synthetic_volume[:, :, 0:1], SYNTHETIC_UID, 1)
    with pytest.raises(InputError, match="is 2D.*3D volumes.*single slice"):
        read_volume(folder)


# ---- rejected inputs --------------------------------------------------------------------------
def test_missing_path(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.nii.gz", tmp_path / "no_folder"):
        with pytest.raises(InputError, match="does not exist") as info:
            read_volume(missing)
        assert str(missing) in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        read_dicom_series(tmp_path / "no_folder")


def test_text_file_named_like_nifti(tmp_path: Path) -> None:
    fake = tmp_path / "scan.nii.gz"
    fake.write_text("this is not an image\n")
    with pytest.raises(InputError) as info:
        read_volume(fake)
    message = str(info.value)
    assert str(fake) in message and "not an image file" in message
    for accepted in (".nii.gz", ".nrrd", ".mha", "DICOM series"):
        assert accepted in message


def test_truncated_nifti(tmp_path: Path, synthetic_volume: sitk.Image) -> None:
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(synthetic_volume, str(whole))
    data = whole.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_volume(cut)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF  # corrupt one byte of the deflate stream
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(bytes(bad))
    with pytest.raises(InputError, match="corrupt|truncated"):
        read_volume(broken)
    # a multi-member gzip file is valid
    multi = tmp_path / "multi.nii.gz"
    raw = gzip.decompress(data)
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert read_volume(multi).GetSize() == synthetic_volume.GetSize()


@pytest.mark.parametrize(
    "name,size",
    [("slice.png", (30, 20)), ("slice.nii.gz", (30, 20)), ("one_slice.nii.gz", (30, 20, 1)), ("one_column.mha", (1, 20, 9))],
)
def test_2d_images(tmp_path: Path, name: str, size: tuple[int, ...]) -> None:
    path = tmp_path / name
    sitk.WriteImage(sitk.Image(list(size), sitk.sitkUInt8), str(path))
    with pytest.raises(InputError, match=r"is 2D .*MedDiffSeg segments 3D volumes") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_single_dicom_file_points_to_the_folder(data_dir: Path) -> None:
    with pytest.raises(InputError, match="is 2D.*pass the folder"):
        read_volume(data_dir / CT3_DICOM / "01.dcm")


def test_4d_image(tmp_path: Path) -> None:
    path = tmp_path / "timeseries.nii.gz"
    sitk.WriteImage(sitk.Image([5, 6, 7, 3], sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match=r"is 4D \(size 5×6×7×3\).*single 3D volume"):
        read_volume(path)


@pytest.mark.parametrize("name", ["vector.mha", "vector.nii.gz"])
def test_multi_component_image(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sitk.WriteImage(sitk.Image([5, 6, 7], sitk.sitkVectorFloat32, 3), str(path))
    with pytest.raises(InputError, match="3 components per voxel.*vector or RGB"):
        read_volume(path)


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="is an empty folder") as info:
        read_volume(empty)
    assert str(empty) in str(info.value) and "DICOM series" in str(info.value)


def test_folder_without_dicom(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "readme.txt").write_text("no images here")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(folder / "volume.nii.gz"))
    with pytest.raises(InputError, match=r"contains no DICOM files \(2 other files, 1 subfolders\).*subfolder"):
        read_volume(folder)


def test_path_that_is_not_a_folder_for_read_dicom_series(data_dir: Path) -> None:
    with pytest.raises(InputError, match="is not a folder"):
        read_dicom_series(data_dir / CT3_DICOM / "01.dcm")


def test_folder_with_two_series(data_dir: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in (data_dir / CT_DICOM, data_dir / CT3_DICOM):
        for f in source.iterdir():
            (mixed / f.name).symlink_to(f)
    with pytest.raises(InputError) as info:
        read_volume(mixed)
    message = str(info.value)
    assert str(mixed) in message and "holds 2 DICOM series" in message and "own folder" in message
    lines = [line for line in message.splitlines() if line.strip().startswith("-")]
    assert len(lines) == 2
    ct3_uid = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    assert any("(empty)" in line and '"CT Body 3.0"' in line and "20 files" in line and "CT" in line for line in lines)
    assert any(ct3_uid in line and "3 files" in line and "(no description)" in line for line in lines)

    # never patient data: names, IDs, dates from the headers stay out of the message
    for source in (data_dir / CT_DICOM, data_dir / CT3_DICOM):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(next(source.iterdir())))
        reader.ReadImageInformation()
        for tag in ("0010|0010", "0010|0020", "0010|0030", "0008|0020", "0008|0030"):
            value = reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            if len(value) >= 4:
                assert value not in message, tag


def test_dicom_segmentation_is_not_an_input(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"DICOM segmentation \(SEG\), not a CT or MR scan"):
        read_volume(data_dir / "dcmqi" / "liver.dcm")
    folder = tmp_path / "seg_only"
    folder.mkdir()
    (folder / "liver.dcm").symlink_to(data_dir / "dcmqi" / "liver.dcm")
    with pytest.raises(InputError, match="DICOM segmentation"):
        read_volume(folder)


def test_errors_exit_codes() -> None:
    assert InputError.exit_code == 2 and OutputError.exit_code == 5


# ---- atomic writing ---------------------------------------------------------------------------
def _small_image(value: int = 3) -> sitk.Image:
    image = sitk.Image([4, 5, 6], sitk.sitkUInt8) + value
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetOrigin((-1.0, 2.0, 5.0))
    return image


def test_write_creates_parents_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "out" / "deeper" / "segmentation.nii.gz"
    write_image_atomic(_small_image(1), target)
    write_image_atomic(_small_image(7), target)
    assert _listing(target.parent) == ["segmentation.nii.gz"]
    back = sitk.ReadImage(str(target))
    assert int(sitk.GetArrayViewFromImage(back).max()) == 7
    _assert_same_geometry(back, _small_image())


@pytest.mark.parametrize("name,produced", [("volume.mhd", ["volume.mhd", "volume.raw"]), ("volume.nhdr", None)])
def test_write_formats_with_a_separate_data_file(tmp_path: Path, name: str, produced: list[str] | None) -> None:
    target = tmp_path / name
    write_image_atomic(_small_image(5), target, compress=False)
    files = _listing(tmp_path)
    assert name in files and not any(f.startswith(".tmp-") for f in files)
    if produced is not None:
        assert files == produced
    back = read_volume(target)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayFromImage(_small_image(5)))


def test_write_under_a_regular_file_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder.txt"
    blocker.write_text("x")
    target = blocker / "segmentation.nii.gz"
    with pytest.raises(OutputError) as info:
        write_image_atomic(_small_image(), target)
    assert str(target) in str(info.value)
    assert _listing(tmp_path) == ["not_a_folder.txt"]


def test_write_onto_a_folder_or_unknown_extension_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "taken.nii.gz").mkdir()
    with pytest.raises(OutputError, match="existing folder"):
        write_image_atomic(_small_image(), tmp_path / "taken.nii.gz")
    with pytest.raises(OutputError, match="unknown file extension") as info:
        write_image_atomic(_small_image(), tmp_path / "segmentation.xyz")
    assert str(tmp_path / "segmentation.xyz") in str(info.value)
    assert _listing(tmp_path) == ["taken.nii.gz"]


def test_failed_write_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "segmentation.nii.gz"
    write_image_atomic(_small_image(1), target)
    before = target.read_bytes()
    seen: list[str] = []

    def half_write(image: sitk.Image, file_name: str, *args, **kwargs) -> None:
        seen.append(file_name)
        Path(file_name).write_bytes(b"\x1f\x8b partial")  # the disk filled up half way
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(OutputError, match="disk full") as info:
        write_image_atomic(_small_image(9), target)
    assert str(target) in str(info.value)
    # the temporary kept the real extension and lived beside the target
    assert seen and seen[0].endswith("segmentation.nii.gz") and Path(seen[0]).parent.parent == tmp_path
    assert ".tmp-" in seen[0]
    assert target.read_bytes() == before  # the previous result is untouched
    assert _listing(tmp_path) == ["segmentation.nii.gz"]

    fresh = tmp_path / "fresh.nrrd"
    with pytest.raises(OutputError):
        write_image_atomic(_small_image(9), fresh)
    assert not fresh.exists() and _listing(tmp_path) == ["segmentation.nii.gz"]


# ---- arrays -----------------------------------------------------------------------------------
def test_image_from_array(data_dir: Path) -> None:
    reference = read_volume(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz")
    labels = (sitk.GetArrayFromImage(reference) > 0).astype(np.uint8)
    image = image_from_array(labels, reference)
    _assert_same_geometry(image, reference, tol_mm=0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), labels)

    assert image_from_array(labels.astype(bool), reference).GetPixelID() == sitk.sitkUInt8
    assert image_from_array(labels.astype(np.float64), reference).GetPixelID() == sitk.sitkFloat32
    assert image_from_array(torch.from_numpy(labels.astype(np.float32)), reference).GetPixelID() == sitk.sitkFloat32
    with pytest.raises(ValueError, match="shape"):
        image_from_array(labels[:, :, :-1], reference)
    with pytest.raises(ValueError, match="shape"):
        image_from_array(labels.transpose(2, 1, 0), reference)


def _churn_memory(shape: tuple[int, ...], rounds: int = 8) -> None:
    """Allocate and fill images of the same size, so that freed voxel buffers get reused."""
    keep = []
    for r in range(rounds):
        keep.append(sitk.GetImageFromArray(np.full(shape, -7.0 - r, np.float32)))
    del keep


def test_array_view_keeps_its_image_alive() -> None:
    values = np.random.default_rng(0).random((12, 34, 56)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    view = array_view(image)
    part = view[3:9, ::2]  # an array derived from it without a copy holds the image too
    del image
    import gc

    gc.collect()
    _churn_memory(values.shape)
    np.testing.assert_array_equal(view, values)
    np.testing.assert_array_equal(part, values[3:9, ::2])
    assert not view.flags.writeable  # the image's voxels are read through it, never written
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    assert array_view(vec).shape == (4, 5, 6, 3)


def test_array_on_a_dicom_grid_outlives_its_image() -> None:
    """align_to_grid may return the image's voxels as they are; they must stay valid without the image."""
    from MedDiffSegLib.dicom import Grid, align_to_grid

    values = np.random.default_rng(1).random((6, 20, 24)).astype(np.float32)

    def aligned() -> np.ndarray:
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((0.7, 0.7, 2.0))
        return align_to_grid(image, Grid.of(image), "the map")  # the image is dropped on return

    array = aligned()
    import gc

    gc.collect()
    _churn_memory(values.shape)
    np.testing.assert_array_equal(array, values)
