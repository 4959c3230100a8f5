"""MedDiffSegLib: diffusion-model segmentation of CT and MRI volumes with ensemble uncertainty.

The library never imports Slicer or Qt; the Slicer module (``MedDiffSeg/``) and the CLI
(``MedDiffSegLib.cli``) are thin layers over it.
"""

__version__ = "0.1.0"
