"""Segmentation methods behind the :class:`~MedDiffSegLib.methods.base.Method` seam.

Import a method module to register it; :func:`build_method` imports the built-in ones itself.
"""

from .base import Method, available_methods, build_method, register_method

__all__ = ["Method", "available_methods", "build_method", "register_method"]
