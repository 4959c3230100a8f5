"""Volume input/output and exact reorientation.

- :func:`read_volume`: a 3D volume file or a DICOM series folder -> ``SimpleITK.Image``
  (pixel type as stored), with a clear :class:`~MedDiffSegLib.errors.InputError` otherwise.
- :func:`read_dicom_series`: the image and its file names in slice order.
- :func:`write_image_atomic`: complete file or nothing.
- :func:`image_from_array`: a numpy ``[z, y, x]`` array on a reference image's grid.
- :func:`array_view`: the voxels as a numpy view that keeps its image alive (no copy).
- :class:`CanonicalView`: input array <-> canonical (e.g. ``LPS``) array, exact.
"""

from .geometry import CanonicalView, closest_axes, orientation_code, parse_orientation
from .volume import ACCEPTED_INPUTS, array_view, image_from_array, read_dicom_series, read_volume, write_image_atomic

__all__ = [
    "ACCEPTED_INPUTS",
    "array_view",
    "CanonicalView",
    "closest_axes",
    "image_from_array",
    "orientation_code",
    "parse_orientation",
    "read_dicom_series",
    "read_volume",
    "write_image_atomic",
]
