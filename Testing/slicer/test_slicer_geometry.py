"""Volume node <-> SimpleITK image: exact geometry (RAS <-> LPS, direction, spacing, origin), on real MRML.

Checked on oblique, flipped, left-handed and axis-permuted grids: every voxel index maps to the
same physical point through Slicer's IJK->RAS and through SimpleITK's index->LPS (with the
RAS/LPS sign flip), the voxels are the same array in the same order, and round trips through
nodes, NRRD (storage node) and NIfTI files keep the grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLogicLib import geometry, nodes


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GRIDS = {
    # name: (RAS directions (columns = I, J, K axes), spacing, RAS origin)
    "identity": (np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "lps-like-flip": (np.diag([-1.0, -1.0, 1.0]), (0.78125, 0.78125, 2.5), (250.3, 180.1, -400.25)),
    "oblique": (rotation(0.31, -0.17, 0.52), (0.7, 1.3, 2.1), (10.123456789, -20.5, 33.3)),
    "left-handed-oblique": (rotation(0.2, 0.4, -0.9) @ np.diag([1.0, -1.0, 1.0]), (1.1, 0.9, 3.0), (-5.0, 7.25, 12.5)),
    "sagittal-permuted": (np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (1.5, 1.0, 1.2), (90.0, -120.0, 60.0)),
}


def make_volume(slicer, directions, spacing, origin, shape=(7, 9, 11), dtype=np.int16, name="grid"):
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 1500, size=shape).astype(dtype)
    node = slicer.util.addVolumeFromArray(array, name=name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections([[float(v) for v in row] for row in directions])
    return node, array


def ras_of_index(node, ijk) -> np.ndarray:
    m = geometry.ijkToRasArray(node)
    return (m @ np.array([*ijk, 1.0]))[:3]


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_node_to_image_maps_every_index_to_the_same_point(mrml, slicer, grid):
    directions, spacing, origin = GRIDS[grid]
    node, array = make_volume(slicer, directions, spacing, origin)
    image = geometry.imageFromVolumeNode(node)
    # same voxels, same order, same type
    assert np.array_equal(sitk.GetArrayViewFromImage(image), array)
    assert sitk.GetArrayViewFromImage(image).dtype == array.dtype
    # same physical point for every corner and some interior (also fractional) indices
    rng = np.random.default_rng(0)
    k, j, i = array.shape
    corners = [(a, b, c) for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)]
    indices = corners + [tuple(rng.uniform(-0.5, s - 0.5) for s in (i, j, k)) for _ in range(20)]
    for ijk in indices:
        lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
        assert np.allclose(geometry.lpsToRas(lps), ras_of_index(node, ijk), atol=1e-9), (grid, ijk)
    assert np.allclose(image.GetSpacing(), spacing, rtol=1e-12)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_image_to_node_to_image_round_trip_is_exact(mrml, slicer, grid):
    directions, spacing, origin = GRIDS[grid]
    rng = np.random.default_rng(1)
    array = rng.random((5, 6, 4)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(geometry.rasToLps(origin))
    image.SetDirection(tuple((geometry.FLIP_LPS_RAS @ directions).reshape(-1)))
    before = mrml.node_count()
    node = geometry.volumeNodeFromImage(image, "from-image")
    assert mrml.node_count() > before
    back = geometry.imageFromVolumeNode(node)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), array)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-12)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    assert np.allclose(geometry.directionsRAS(node), directions, atol=1e-12)


def test_copy_geometry_and_same_grid(mrml, slicer):
    a, _ = make_volume(slicer, *GRIDS["oblique"], name="a")
    b = slicer.util.addVolumeFromArray(np.zeros((7, 9, 11), np.float32), name="b")
    assert not geometry.sameGrid(geometry.dimensions(a), geometry.ijkToRasArray(a),
                                 geometry.dimensions(b), geometry.ijkToRasArray(b))
    geometry.copyGeometry(a, b)
    assert np.array_equal(geometry.ijkToRasArray(a), geometry.ijkToRasArray(b))
    assert not geometry.sameGrid((11, 9, 7), geometry.ijkToRasArray(a), (11, 9, 8), geometry.ijkToRasArray(a))


def test_vector_volume_is_refused(mrml, slicer):
    node = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5, 3), np.uint8), name="rgb",
                                          nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(ValueError, match="components per voxel"):
        geometry.imageFromVolumeNode(node)


@pytest.mark.parametrize("grid", ["oblique", "left-handed-oblique"])
def test_storage_node_nrrd_write_is_read_by_simpleitk_on_the_same_grid(mrml, slicer, tmp_path, grid):
    node, array = make_volume(slicer, *GRIDS[grid])
    expected = geometry.imageFromVolumeNode(node)
    before = mrml.node_count()
    nodes.writeVolumeNode(node, str(tmp_path / "v.nrrd"))
    assert mrml.node_count() == before, "writing must not add nodes (storage node kept out of the scene)"
    image = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    assert np.array_equal(sitk.GetArrayViewFromImage(image), array)
    assert np.allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    assert np.allclose(image.GetDirection(), expected.GetDirection(), atol=1e-12)
    assert np.allclose(image.GetSpacing(), expected.GetSpacing(), rtol=1e-12)


def test_nifti_written_by_simpleitk_reads_back_through_a_storage_node(mrml, slicer, tmp_path):
    node, array = make_volume(slicer, *GRIDS["oblique"])
    image = geometry.imageFromVolumeNode(node)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(tmp_path / "u.nii.gz"))
    before = mrml.node_count()
    data, ijk_to_ras, dims = nodes.readVolumeFile(str(tmp_path / "u.nii.gz"))
    assert mrml.node_count() == before
    assert np.array_equal(data, array.astype(np.float32))
    # NIfTI stores the geometry in float32: the same grid within that precision, which checkSameGrid accepts
    assert geometry.sameGrid(dims, ijk_to_ras, geometry.dimensions(node), geometry.ijkToRasArray(node))
    nodes.checkSameGrid(node, dims, ijk_to_ras, "test")
    shifted = ijk_to_ras.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(RuntimeError, match="not on the input volume's voxel grid"):
        nodes.checkSameGrid(node, dims, shifted, "test")


def test_real_ct_through_a_storage_node_matches_simpleitk(mrml, slicer, data_dir):
    path = data_dir / "totalsegmentator" / "example_ct.nii.gz"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    assert storage.ReadData(node)
    direct = sitk.ReadImage(str(path))
    converted = geometry.imageFromVolumeNode(node)
    assert np.array_equal(sitk.GetArrayViewFromImage(converted), sitk.GetArrayViewFromImage(direct))
    assert np.allclose(converted.GetOrigin(), direct.GetOrigin(), atol=1e-4)
    assert np.allclose(converted.GetDirection(), direct.GetDirection(), atol=1e-6)
    assert np.allclose(converted.GetSpacing(), direct.GetSpacing(), rtol=1e-6)


def test_dicom_series_library_and_storage_node_agree(mrml, slicer, data_dir):
    """The library's DICOM reader pushed into a node == Slicer's storage node reading the ordered file list."""
    from MedDiffSegLib.io.volume import read_dicom_series

    image, files = read_dicom_series(data_dir / "totalsegmentator" / "example_ct_dicom")
    pushed = geometry.volumeNodeFromImage(image, "dicom (library)")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(files[0])
    for f in files:
        storage.AddFileName(f)
    storage.SetSingleFile(0)
    read = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dicom (storage node)")
    assert storage.ReadData(read)
    assert np.array_equal(slicer.util.arrayFromVolume(pushed), slicer.util.arrayFromVolume(read))
    assert np.allclose(geometry.ijkToRasArray(pushed), geometry.ijkToRasArray(read), atol=1e-6)
    assert np.array_equal(slicer.util.arrayFromVolume(pushed), sitk.GetArrayViewFromImage(image))
