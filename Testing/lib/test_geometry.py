"""CanonicalView: exact reorientation checked against SimpleITK's DICOMOrient and physical points."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.io import CanonicalView, closest_axes, orientation_code, parse_orientation, read_volume

SHAPE_ZYX = (5, 6, 7)  # all different, so a wrong permutation cannot go unnoticed
SPACING_XYZ = (0.7, 0.9, 3.0)  # anisotropic


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _axes_matrix(code: str) -> np.ndarray:
    """Direction matrix whose image axes point exactly along ``code`` (DICOMOrient convention)."""
    d = np.zeros((3, 3))
    for a, (p, sign) in enumerate(parse_orientation(code)):
        d[p, a] = sign
    return d


# name -> direction matrix (columns = image axes i, j, k in LPS physical space)
DIRECTIONS: dict[str, np.ndarray] = {
    "identity_LPS": _axes_matrix("LPS"),
    "nifti_RAS": _axes_matrix("RAS"),
    "flipped_RPI": _axes_matrix("RPI"),
    "flipped_LAI": _axes_matrix("LAI"),
    "sagittal_PIR": _axes_matrix("PIR"),  # sagittal acquisition: rows run P, columns I, slices R
    "sagittal_ASL": _axes_matrix("ASL"),
    "coronal_LIP": _axes_matrix("LIP"),
    "coronal_RSA": _axes_matrix("RSA"),
    "oblique_20x": _rotation(0, 20) @ _axes_matrix("LPS"),
    "oblique_20z_RAS": _rotation(2, -20) @ _axes_matrix("RAS"),
    "oblique_20y_sagittal": _rotation(1, 20) @ _axes_matrix("PIR"),
    "oblique_compound": _rotation(0, 15) @ _rotation(1, -20) @ _rotation(2, 25) @ _axes_matrix("ASL"),
}


def make_image(direction: np.ndarray, seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 2000, size=SHAPE_ZYX, dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin((-12.5, 40.25, 300.0))
    image.SetDirection(direction.reshape(-1).tolist())
    return image


CASES = [pytest.param(name, code, id=f"{name}-to-{code}") for name in DIRECTIONS for code in ("LPS", "RAS", "PIR")]


def _corners(size_xyz) -> list[tuple[int, int, int]]:
    return [tuple(c) for c in itertools.product(*[(0, n - 1) for n in size_xyz])]


@pytest.mark.parametrize("name,code", CASES)
def test_matches_dicomorient(name: str, code: str) -> None:
    image = make_image(DIRECTIONS[name])
    view = CanonicalView.from_image(image, code)
    reference = sitk.DICOMOrient(image, code)

    array = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(view.to_canonical(array), sitk.GetArrayFromImage(reference))
    assert view.shape_kji == sitk.GetArrayViewFromImage(reference).shape
    assert view.spacing_kji == pytest.approx(tuple(reversed(reference.GetSpacing())), abs=0)

    canonical = view.canonical_image(image)
    assert canonical.GetSize() == reference.GetSize()
    np.testing.assert_allclose(canonical.GetDirection(), reference.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(canonical.GetOrigin(), reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(canonical.GetSpacing(), reference.GetSpacing(), atol=0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(canonical), sitk.GetArrayViewFromImage(reference))


@pytest.mark.parametrize("name,code", CASES)
def test_round_trip_is_exact(name: str, code: str) -> None:
    image = make_image(DIRECTIONS[name], seed=1)
    view = CanonicalView.from_image(image, code)
    array = sitk.GetArrayFromImage(image)
    back = view.from_canonical(view.to_canonical(array))
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)

    # leading axes (e.g. one probability map per organ) are carried along untouched
    stack = np.stack([array, -array, array // 2])
    canon = view.to_canonical(stack)
    assert canon.shape == (3, *view.shape_kji)
    np.testing.assert_array_equal(canon[1], -view.to_canonical(array))
    np.testing.assert_array_equal(view.from_canonical(canon), stack)

    # torch tensors give the same arrays
    tensor = torch.from_numpy(stack.astype(np.float32))
    canon_t = view.to_canonical(tensor)
    assert isinstance(canon_t, torch.Tensor)
    np.testing.assert_array_equal(canon_t.numpy(), canon.astype(np.float32))
    assert torch.equal(view.from_canonical(canon_t), tensor)


@pytest.mark.parametrize("name,code", CASES)
def test_corner_voxels_keep_their_physical_position(name: str, code: str) -> None:
    image = make_image(DIRECTIONS[name], seed=2)
    view = CanonicalView.from_image(image, code)
    canonical = view.canonical_image(image)
    canon_array = sitk.GetArrayViewFromImage(canonical)
    input_array = sitk.GetArrayViewFromImage(image)

    input_points = sorted(image.TransformIndexToPhysicalPoint(c) for c in _corners(image.GetSize()))
    canon_points = sorted(canonical.TransformIndexToPhysicalPoint(c) for c in _corners(canonical.GetSize()))
    np.testing.assert_allclose(canon_points, input_points, atol=1e-9)

    for i, j, k in _corners(canonical.GetSize()):
        z, y, x = view.input_index_of_canonical((k, j, i))
        np.testing.assert_allclose(
            canonical.TransformIndexToPhysicalPoint((i, j, k)), image.TransformIndexToPhysicalPoint((x, y, z)), atol=1e-9
        )
        assert canon_array[k, j, i] == input_array[z, y, x]


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_canonical_lps_axes_point_left_posterior_superior(name: str) -> None:
    image = make_image(DIRECTIONS[name])
    canonical = CanonicalView.from_image(image, "LPS").canonical_image(image)
    d = np.array(canonical.GetDirection()).reshape(3, 3)
    # each canonical axis i, j, k is within 45° of +x (L), +y (P), +z (S) respectively
    assert all(d[a, a] > math.cos(math.radians(45)) for a in range(3)), d
    assert orientation_code(canonical) == "LPS"


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_input_index_of_canonical_slice(name: str) -> None:
    image = make_image(DIRECTIONS[name])
    view = CanonicalView.from_image(image, "LPS")
    for k in range(view.shape_kji[0]):
        axis, index = view.input_index_of_canonical_slice(k)
        marked = np.zeros(SHAPE_ZYX, dtype=np.uint8)
        slicer = [slice(None)] * 3
        slicer[axis] = index
        marked[tuple(slicer)] = 1
        canon = view.to_canonical(marked)
        assert canon[k].all() and canon.sum() == canon[k].size, (k, axis, index)
    with pytest.raises(IndexError):
        view.input_index_of_canonical_slice(view.shape_kji[0])


def test_identity_and_orientation_codes() -> None:
    lps = CanonicalView.from_image(make_image(DIRECTIONS["identity_LPS"]))
    assert lps.is_identity and lps.input_orientation == "LPS"
    array = np.arange(np.prod(SHAPE_ZYX)).reshape(SHAPE_ZYX)
    assert np.shares_memory(lps.to_canonical(array), array)  # no copy when nothing changes
    ras = CanonicalView.from_image(make_image(DIRECTIONS["nifti_RAS"]))
    assert not ras.is_identity and ras.input_orientation == "RAS" and ras.flipped == (True, True, False)
    sag = CanonicalView.from_image(make_image(DIRECTIONS["oblique_20y_sagittal"]))
    assert sag.input_orientation == "PIR"
    assert sag.source_axis == (2, 0, 1)  # canonical I comes from input k, J from i, K from j
    assert sag.spacing_kji == (SPACING_XYZ[1], SPACING_XYZ[0], SPACING_XYZ[2])


def test_closest_axes_is_a_permutation_for_strongly_oblique_images() -> None:
    # 40° rotations about two axes: a naive per-column argmax may pick one physical axis twice
    for angles in itertools.product((-40, 40), repeat=3):
        d = _rotation(0, angles[0]) @ _rotation(1, angles[1]) @ _rotation(2, angles[2])
        axes = closest_axes(d)
        assert sorted(p for p, _ in axes) == [0, 1, 2]
        image = make_image(d)
        assert orientation_code(image) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(d.reshape(-1).tolist())


def test_bad_arguments() -> None:
    image = make_image(DIRECTIONS["nifti_RAS"])
    for bad in ("LPX", "LLS", "LP", "RASP", ""):
        with pytest.raises(ValueError):
            CanonicalView.from_image(image, bad)
    view = CanonicalView.from_image(image, "lps")
    assert view.orientation == "LPS"
    with pytest.raises(ValueError, match="shape"):
        view.to_canonical(np.zeros((5, 6, 8)))
    with pytest.raises(ValueError, match="shape"):
        view.from_canonical(np.zeros(SHAPE_ZYX[::-1]))
    with pytest.raises(ValueError):
        CanonicalView.from_image(sitk.Image([4, 4], sitk.sitkUInt8))
    with pytest.raises(ValueError):
        view.canonical_image(sitk.Image([4, 4, 4], sitk.sitkUInt8))


def test_vector_image_canonical() -> None:
    image = make_image(_rotation(2, 20) @ DIRECTIONS["sagittal_ASL"])
    vector = sitk.Compose(image, image * 2)
    view = CanonicalView.from_image(vector, "LPS")
    canonical = view.canonical_image(vector)
    reference = sitk.DICOMOrient(vector, "LPS")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(canonical), sitk.GetArrayViewFromImage(reference))
    np.testing.assert_allclose(canonical.GetOrigin(), reference.GetOrigin(), atol=1e-9)


# ---- real volumes ----------------------------------------------------------------------------
def _data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


REAL = sorted(str(p.relative_to(_data_root())) for p in (_data_root() / "totalsegmentator").glob("*.nii.gz")) + [
    "dcmqi/liver_spine_seg.nrrd",
    "totalsegmentator/example_ct_dicom",
]


@pytest.mark.parametrize("relative", REAL)
def test_real_volumes_match_dicomorient(data_dir: Path, relative: str) -> None:
    image = read_volume(data_dir / relative)
    view = CanonicalView.from_image(image, "LPS")
    reference = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayViewFromImage(image)
    canon = view.to_canonical(array)
    np.testing.assert_array_equal(canon, sitk.GetArrayViewFromImage(reference))
    np.testing.assert_array_equal(view.from_canonical(canon), array)
    np.testing.assert_allclose(view.canonical_image(image).GetOrigin(), reference.GetOrigin(), atol=1e-9)
