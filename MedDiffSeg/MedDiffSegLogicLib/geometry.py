"""Exact conversions between Slicer volume nodes and SimpleITK images.

Slicer describes a volume by its IJK→RAS matrix; ITK/SimpleITK by spacing, origin and a direction
matrix in LPS. Both store voxels in the same order (numpy ``[K, J, I]`` from Slicer's
``arrayFromVolume`` is SimpleITK's ``[z, y, x]``), so a conversion never reorders voxels; only the
first two world axes change sign::

    LPS = diag(-1, -1, 1) · RAS
    RAS(ijk) = D_ras · diag(spacing) · ijk + origin_ras        (Slicer)
    LPS(ijk) = D_lps · diag(spacing) · ijk + origin_lps        (SimpleITK)
    => D_lps = F · D_ras,  origin_lps = F · origin_ras,  F = diag(-1, -1, 1)

No resampling, no rounding of directions: an oblique or flipped volume keeps its exact grid.
Only MRML/VTK, numpy and SimpleITK are used here (no Qt), so this runs in tests on slicer-core.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FLIP_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def _slicer():
    import slicer

    return slicer


def lpsToRas(point: Sequence[float]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


rasToLps = lpsToRas  # the same sign flip both ways


def directionsRAS(volumeNode) -> np.ndarray:
    """The node's IJK→RAS direction matrix (3×3, columns = unit vectors of the I, J, K axes in RAS)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)], dtype=np.float64)


def ijkToRasArray(volumeNode) -> np.ndarray:
    """The node's 4×4 IJK→RAS matrix as a numpy array."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def volumeArray(volumeNode) -> np.ndarray:
    """The node's voxels as a numpy view ``[K, J, I]`` (no copy); error for a node without image data."""
    slicer = _slicer()
    if volumeNode is None or volumeNode.GetImageData() is None:
        name = volumeNode.GetName() if volumeNode is not None else "None"
        raise ValueError(f"volume {name!r} holds no image data")
    return slicer.util.arrayFromVolume(volumeNode)


def imageFromVolumeNode(volumeNode):
    """A SimpleITK image with the node's voxels (copied) and its exact geometry converted to LPS.

    Only scalar volumes are accepted: a multi-component (vector/RGB) volume raises ``ValueError``.
    The node's parent transform is not applied (the result is in the node's own coordinates);
    outputs built from it are placed under the same parent transform.
    """
    array = volumeArray(volumeNode)
    if array.ndim != 3:
        raise ValueError(
            f"volume {volumeNode.GetName()!r} has {array.shape[-1] if array.ndim == 4 else '?'} components per voxel; "
            "choose a grey-level (scalar) CT or MR volume"
        )
    return imageFromArray(array, volumeNode)


def imageFromArray(array_kji: np.ndarray, volumeNode):
    """A SimpleITK image holding ``array_kji`` (``[K, J, I]``, copied) on ``volumeNode``'s exact grid (LPS)."""
    import SimpleITK as sitk

    array_kji = np.asarray(array_kji)
    expected = tuple(reversed(dimensions(volumeNode)))
    if array_kji.shape != expected:
        raise ValueError(f"array of shape {array_kji.shape} does not match volume {volumeNode.GetName()!r} "
                         f"of shape {expected}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    geometry = lpsGeometry(volumeNode)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def lpsGeometry(volumeNode) -> dict[str, tuple[float, ...]]:
    """The node's grid as SimpleITK describes it: ``spacing``, ``origin`` (LPS) and ``direction`` (LPS,
    row-major 3×3), exactly (see the module docstring)."""
    return {"spacing": tuple(float(s) for s in volumeNode.GetSpacing()),
            "origin": rasToLps(volumeNode.GetOrigin()),
            "direction": tuple(float(v) for v in (FLIP_LPS_RAS @ directionsRAS(volumeNode)).reshape(-1))}


def worldToVolumeRas(volumeNode, rasWorld: Sequence[float]) -> tuple[float, float, float]:
    """A world RAS point (where Slicer places markups) in the volume's own RAS coordinates: the inverse
    of the volume's parent transform, when it has one (its voxels and ``imageFromVolumeNode`` are there)."""
    return _throughParentTransform(volumeNode, rasWorld, toWorld=False)


def volumeRasToWorld(volumeNode, ras: Sequence[float]) -> tuple[float, float, float]:
    """The inverse of :func:`worldToVolumeRas`."""
    return _throughParentTransform(volumeNode, ras, toWorld=True)


def _throughParentTransform(volumeNode, point: Sequence[float], toWorld: bool) -> tuple[float, float, float]:
    point = tuple(float(v) for v in point)
    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return point  # type: ignore[return-value]
    import vtk

    transform = vtk.vtkGeneralTransform()
    source, target = (parent, None) if toWorld else (None, parent)
    _slicer().vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, transform)
    return tuple(float(v) for v in transform.TransformPoint(point))  # type: ignore[return-value]


def rasToIjk(volumeNode, ras: Sequence[float]) -> np.ndarray:
    """Continuous (I, J, K) of a point in the volume's own RAS coordinates."""
    inverse = np.linalg.inv(ijkToRasArray(volumeNode))
    return (inverse @ np.array([*(float(v) for v in ras), 1.0]))[:3]


def insideVolume(volumeNode, ras: Sequence[float]) -> bool:
    """Whether a point (the volume's own RAS) lies in a voxel of the volume (within half a voxel of a centre)."""
    ijk = rasToIjk(volumeNode, ras)
    return bool(all(-0.5 <= c <= n - 0.5 for c, n in zip(ijk, dimensions(volumeNode))))


def setVolumeNodeGeometryFromImage(volumeNode, image) -> None:
    """Give ``volumeNode`` the image's spacing, origin and direction (LPS → RAS), exactly."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    rasDirections = FLIP_LPS_RAS @ direction
    volumeNode.SetSpacing(*[float(s) for s in image.GetSpacing()])
    volumeNode.SetOrigin(*lpsToRas(image.GetOrigin()))
    volumeNode.SetIJKToRASDirections([[float(v) for v in row] for row in rasDirections])


def updateVolumeNodeFromImage(volumeNode, image) -> None:
    """Replace the node's voxels (copied) and geometry with the image's."""
    import SimpleITK as sitk

    slicer = _slicer()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("only scalar images can be pushed into a scalar volume node")
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayViewFromImage(image))
    setVolumeNodeGeometryFromImage(volumeNode, image)


def volumeNodeFromImage(image, name: str, scene=None, className: str = "vtkMRMLScalarVolumeNode"):
    """Add a new volume node holding the image (voxels and exact geometry) to ``scene``."""
    slicer = _slicer()
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass(className, name)
    try:
        updateVolumeNodeFromImage(node, image)
        node.CreateDefaultDisplayNodes()
    except Exception:
        scene.RemoveNode(node)
        raise
    return node


def copyGeometry(source, target) -> None:
    """Give ``target`` exactly the IJK→RAS of ``source`` (both volume nodes)."""
    target.SetSpacing(*source.GetSpacing())
    target.SetOrigin(*source.GetOrigin())
    target.SetIJKToRASDirections([[float(v) for v in row] for row in directionsRAS(source)])


def sameGrid(dimensionsA, ijkToRasA: np.ndarray, dimensionsB, ijkToRasB: np.ndarray,
             atol_mm: float = 1e-3, rtol: float = 1e-5) -> bool:
    """True when two voxel grids coincide (same size, IJK→RAS equal within the tolerances)."""
    if tuple(int(d) for d in dimensionsA) != tuple(int(d) for d in dimensionsB):
        return False
    a = np.asarray(ijkToRasA, dtype=np.float64)
    b = np.asarray(ijkToRasB, dtype=np.float64)
    return bool(np.allclose(a[:3, :3], b[:3, :3], rtol=rtol, atol=1e-6) and np.allclose(a[:3, 3], b[:3, 3], atol=atol_mm))


def dimensions(volumeNode) -> tuple[int, int, int]:
    """(I, J, K) sizes of the node's image data."""
    return tuple(int(d) for d in volumeNode.GetImageData().GetDimensions())  # type: ignore[return-value]
