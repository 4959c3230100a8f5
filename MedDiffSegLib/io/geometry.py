"""Exact mapping between an image's voxel order and a canonical anatomical orientation.

Models work on axial slices in one fixed orientation (a model's ``preprocessing.orientation``,
``LPS`` by default). Input volumes come in any orientation: flipped (NIfTI files are often
``RAS``-like), permuted (sagittal or coronal acquisitions) or oblique. :class:`CanonicalView`
maps an input array onto the canonical orientation and back with numpy transposes and flips
only: no interpolation, so a result mapped back lands on exactly the input's voxels.

Conventions
-----------
- Arrays are in SimpleITK/numpy order: ``array[z, y, x]`` indexes image axes (k, j, i) of the
  input; canonical arrays are ``[K, J, I]`` where ``I, J, K`` are the canonical image axes.
- Orientation codes follow SimpleITK's ``DICOMOrient``: the letters say where each of the image
  axes ``i, j, k`` *runs to* in the patient, in ITK's LPS physical space. ``"LPS"``: ``i`` runs
  to patient Left (+x), ``j`` to Posterior (+y), ``k`` to Superior (+z). An ``LPS`` array
  ``[K, J, I]`` is therefore a stack of axial slices, each in radiological display order
  (patient right on the image's left, anterior at the top), slices from feet to head.
- Each input axis is assigned the physical axis its direction cosine is closest to, greedily
  by the largest absolute cosine first (what ``DICOMOrient`` does), so oblique images map to
  their nearest orthogonal orientation. The canonical image keeps the input's (oblique)
  direction cosines, only permuted and negated, so every voxel keeps its physical position.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import SimpleITK as sitk

ArrayT = TypeVar("ArrayT")

# Letter -> (physical axis in ITK's LPS world, +1 if the letter is the positive end).
_LETTERS: dict[str, tuple[int, int]] = {
    "L": (0, +1), "R": (0, -1),
    "P": (1, +1), "A": (1, -1),
    "S": (2, +1), "I": (2, -1),
}
_CODE_OF: dict[tuple[int, int], str] = {v: k for k, v in _LETTERS.items()}


def parse_orientation(code: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``"LPS"`` -> ``((0, 1), (1, 1), (2, 1))``: (physical axis, sign) for image axes i, j, k.

    Raises ``ValueError`` unless the code has one letter from each of ``R/L``, ``A/P``, ``I/S``.
    """
    if not isinstance(code, str) or len(code) != 3:
        raise ValueError(f"orientation must be a 3-letter code such as 'LPS', got {code!r}")
    try:
        axes = tuple(_LETTERS[c] for c in code.upper())
    except KeyError:
        raise ValueError(f"orientation {code!r} may only use the letters R, L, A, P, I, S") from None
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} must name each of R/L, A/P and I/S exactly once")
    return axes  # type: ignore[return-value]


def closest_axes(direction: np.ndarray) -> list[tuple[int, int]]:
    """For each image axis (column of the 3×3 ``direction``), its nearest (physical axis, sign).

    Greedy on the largest absolute cosine, removing the matched image axis and physical axis
    each time, so the result is always a permutation even for strongly oblique images.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    result: list[tuple[int, int] | None] = [None, None, None]
    free_phys, free_img = {0, 1, 2}, {0, 1, 2}
    for _ in range(3):
        best = max(((abs(d[p, a]), p, a) for p in free_phys for a in free_img))
        _, p, a = best
        result[a] = (p, 1 if d[p, a] >= 0 else -1)
        free_phys.discard(p)
        free_img.discard(a)
    return result  # type: ignore[return-value]


def orientation_code(image: sitk.Image) -> str:
    """The nearest DICOMOrient-style code of ``image`` (e.g. ``"LPS"``, ``"RAS"``, ``"PIR"``)."""
    return "".join(_CODE_OF[t] for t in closest_axes(np.array(image.GetDirection())))


def _is_torch(array) -> bool:
    """Whether ``array`` is a torch tensor, without importing torch (geometry never needs it: it is also used
    in Slicer's process before torch is installed; a tensor can only exist once torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(array, torch.Tensor)


@dataclass(frozen=True)
class CanonicalView:
    """Exact reorientation of one image's voxel grid to a canonical orientation.

    Build it with :meth:`from_image`. ``to_canonical`` and ``from_canonical`` act on the last
    three axes of numpy arrays or torch tensors, so ``[C, z, y, x]`` stacks work as well.

    Attributes
    ----------
    orientation: the canonical code (e.g. ``"LPS"``).
    input_orientation: the nearest code of the input image (e.g. ``"RAS"``).
    input_shape_zyx: the input array's shape.
    source_axis: for canonical image axes (I, J, K), the input image axis (0=i/x, 1=j/y, 2=k/z)
        each one comes from.
    flipped: for canonical image axes (I, J, K), whether the input axis is reversed.
    spacing_kji, shape_kji: canonical spacing (mm) and shape in ``[K, J, I]`` order.
    """

    orientation: str
    input_orientation: str
    input_shape_zyx: tuple[int, int, int]
    input_spacing_xyz: tuple[float, float, float]
    source_axis: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]

    @classmethod
    def from_image(cls, image: sitk.Image, orientation: str = "LPS") -> "CanonicalView":
        """The view that maps ``image``'s array onto ``orientation`` (DICOMOrient code)."""
        if image.GetDimension() != 3:
            raise ValueError(f"CanonicalView needs a 3D image, got a {image.GetDimension()}D one")
        target = parse_orientation(orientation)
        current = closest_axes(np.array(image.GetDirection()))
        source_axis: list[int] = []
        flipped: list[bool] = []
        for phys, sign in target:
            a = next(a for a, (p, _) in enumerate(current) if p == phys)
            source_axis.append(a)
            flipped.append(current[a][1] != sign)
        size = image.GetSize()
        return cls(
            orientation=orientation.upper(),
            input_orientation="".join(_CODE_OF[t] for t in current),
            input_shape_zyx=(size[2], size[1], size[0]),
            input_spacing_xyz=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            source_axis=tuple(source_axis),  # type: ignore[arg-type]
            flipped=tuple(flipped),  # type: ignore[arg-type]
        )

    # ---- derived geometry -------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        """True when the input already is in the canonical orientation (no copy needed)."""
        return self.source_axis == (0, 1, 2) and not any(self.flipped)

    @property
    def _perm_kji(self) -> tuple[int, int, int]:
        """numpy axes of the input array (z, y, x = 0, 1, 2) that become canonical K, J, I."""
        return tuple(2 - self.source_axis[c] for c in (2, 1, 0))  # type: ignore[return-value]

    @property
    def _flip_kji(self) -> tuple[bool, bool, bool]:
        return (self.flipped[2], self.flipped[1], self.flipped[0])

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        """Shape of the canonical array ``[K, J, I]``."""
        return tuple(self.input_shape_zyx[a] for a in self._perm_kji)  # type: ignore[return-value]

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """Canonical voxel spacing in mm, ``(sK, sJ, sI)``: slice thickness first, then rows, columns."""
        return tuple(self.input_spacing_xyz[self.source_axis[c]] for c in (2, 1, 0))  # type: ignore[return-value]

    # ---- array mapping ----------------------------------------------------------------
    def _check(self, array, expected: tuple[int, ...], what: str) -> None:
        shape = tuple(array.shape)
        if len(shape) < 3 or shape[-3:] != expected:
            raise ValueError(f"{what} must end in shape {expected}, got {shape}")

    def to_canonical(self, array_zyx: ArrayT) -> ArrayT:
        """Input array ``[..., z, y, x]`` -> canonical ``[..., K, J, I]`` (numpy view or torch tensor)."""
        self._check(array_zyx, self.input_shape_zyx, "array")
        lead = array_zyx.ndim - 3  # type: ignore[attr-defined]
        perm = tuple(range(lead)) + tuple(lead + a for a in self._perm_kji)
        flips = tuple(lead + i for i, f in enumerate(self._flip_kji) if f)
        if _is_torch(array_zyx):
            out = array_zyx.permute(*perm)  # type: ignore[attr-defined]
            return out.flip(flips) if flips else out
        out = np.transpose(array_zyx, perm)
        return np.flip(out, flips) if flips else out  # type: ignore[return-value]

    def from_canonical(self, array_kji: ArrayT) -> ArrayT:
        """Canonical ``[..., K, J, I]`` -> input order ``[..., z, y, x]``: exact inverse of :meth:`to_canonical`."""
        self._check(array_kji, self.shape_kji, "canonical array")
        lead = array_kji.ndim - 3  # type: ignore[attr-defined]
        flips = tuple(lead + i for i, f in enumerate(self._flip_kji) if f)
        inverse = np.argsort(self._perm_kji)
        perm = tuple(range(lead)) + tuple(lead + int(a) for a in inverse)
        if _is_torch(array_kji):
            out = array_kji.flip(flips) if flips else array_kji  # type: ignore[attr-defined]
            return out.permute(*perm)
        out = np.flip(array_kji, flips) if flips else array_kji
        return np.transpose(out, perm)  # type: ignore[return-value]

    # ---- index mapping ----------------------------------------------------------------
    def input_index_of_canonical_slice(self, k: int) -> tuple[int, int]:
        """Where canonical slice ``k`` lies in the input: ``(numpy axis in [z, y, x], index)``.

        ``to_canonical(a)[k]`` equals ``np.take(a, index, axis=axis)`` up to an in-plane
        transpose/flip, so a caller can stream the input slice by slice.
        """
        n = self.shape_kji[0]
        if not -n <= k < n:
            raise IndexError(f"canonical slice {k} out of range for {n} slices")
        k = k % n
        image_axis = self.source_axis[2]
        return 2 - image_axis, (n - 1 - k if self.flipped[2] else k)

    def input_index_of_canonical(self, kji: tuple[int, int, int]) -> tuple[int, int, int]:
        """Input array index ``(z, y, x)`` of the canonical voxel ``(K, J, I)``."""
        canon_ijk = (kji[2], kji[1], kji[0])
        size_kji = self.shape_kji
        size_ijk = (size_kji[2], size_kji[1], size_kji[0])
        input_ijk = [0, 0, 0]
        for c in range(3):
            v = canon_ijk[c]
            input_ijk[self.source_axis[c]] = size_ijk[c] - 1 - v if self.flipped[c] else v
        return (input_ijk[2], input_ijk[1], input_ijk[0])

    def canonical_of_input_index(self, zyx: tuple[float, float, float]) -> tuple[float, float, float]:
        """Canonical ``(K, J, I)`` of the input array index ``(z, y, x)`` (continuous indices allowed):
        the inverse of :meth:`input_index_of_canonical`."""
        input_ijk = (zyx[2], zyx[1], zyx[0])
        size_kji = self.shape_kji
        size_ijk = (size_kji[2], size_kji[1], size_kji[0])
        canon_ijk = [0.0, 0.0, 0.0]
        for c in range(3):
            v = float(input_ijk[self.source_axis[c]])
            canon_ijk[c] = size_ijk[c] - 1 - v if self.flipped[c] else v
        return (canon_ijk[2], canon_ijk[1], canon_ijk[0])

    # ---- images -----------------------------------------------------------------------
    def canonical_direction(self, image: sitk.Image) -> tuple[float, ...]:
        """Direction matrix (row-major 3×3) of the canonical image: input columns permuted/negated."""
        d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        cols = [d[:, self.source_axis[c]] * (-1.0 if self.flipped[c] else 1.0) for c in range(3)]
        return tuple(np.stack(cols, axis=1).reshape(-1).tolist())

    def canonical_image(self, image: sitk.Image) -> sitk.Image:
        """``image`` resampled-free onto the canonical grid, with geometry so each voxel keeps its position.

        Matches ``sitk.DICOMOrient(image, orientation)`` (voxels, spacing, origin, direction).
        Meant for tests, debugging and writing intermediate results; the engine works on arrays.
        """
        size = image.GetSize()
        if (size[2], size[1], size[0]) != self.input_shape_zyx:
            raise ValueError(f"image size {size} does not match this view's input {self.input_shape_zyx[::-1]}")
        view = sitk.GetArrayViewFromImage(image)
        is_vector = image.GetNumberOfComponentsPerPixel() > 1
        if is_vector:  # [z, y, x, c]: map the spatial axes, keep components last
            array = np.moveaxis(self.to_canonical(np.moveaxis(view, -1, 0)), 0, -1)
        else:
            array = self.to_canonical(view)
        out = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
        sk, sj, si = self.spacing_kji
        out.SetSpacing((si, sj, sk))
        out.SetDirection(self.canonical_direction(image))
        z, y, x = self.input_index_of_canonical((0, 0, 0))
        out.SetOrigin(image.TransformIndexToPhysicalPoint((x, y, z)))
        return out
