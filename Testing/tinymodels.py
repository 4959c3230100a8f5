"""Tiny randomly initialised model packages for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedDiffSegLib.methods.base import _METHODS, _import_builtin_methods, build_method
from MedDiffSegLib.preprocessing import PreprocessSpec
from MedDiffSegLib.registry import ModelPackage, Organ, save_package

SCT = "SCT"
ANATOMY = {"code": "123037004", "scheme": SCT, "meaning": "Anatomical Structure"}
TINY_ORGANS = [
    Organ("liver", "Liver", (221, 130, 101), ANATOMY, {"code": "10200004", "scheme": SCT, "meaning": "Liver"}),
    Organ("spleen", "Spleen", (157, 108, 162), ANATOMY, {"code": "78961009", "scheme": SCT, "meaning": "Spleen"}),
]


def builtin_methods() -> list[str]:
    """The methods of the library (not the ones tests register), sorted."""
    _import_builtin_methods()
    return sorted(n for n, cls in _METHODS.items() if cls.__module__.startswith("MedDiffSegLib.methods."))


def tiny_method(method: str = "guided", num_organs: int = 2, seed: int = 0, prompt_channels: int = 0, **overrides):
    """Method ``method`` with its tiny config (and ``overrides`` of it), random weights from ``seed``."""
    _import_builtin_methods()
    torch.manual_seed(seed)
    cfg = {**_METHODS[method].tiny_config(num_organs), **overrides}
    if prompt_channels:
        cfg["prompt_channels"] = prompt_channels
    m = build_method(method, cfg)
    if prompt_channels:  # a trained prompt encoder acts: give the zero-initialised head weights
        torch.nn.init.normal_(m.prompt_encoder.head.weight, std=0.5)
    return m


def wake_control(m, seed: int = 7) -> None:
    """Give ``meddelinea``'s zero-initialised control path (its zero convolution and zero projections) small
    random weights, as after some training, so that the image reaches the output; other methods: nothing."""
    if getattr(m, "name", "") != "meddelinea":
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m.denoiser.control.cond_zero_conv, *m.denoiser.control.zero_proj):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make_tiny_package(folder: Path, method: str = "guided", *, roi: int = 32, spacing=(6.0, 6.0),
                      modality: str = "CT", seed: int = 0, name: str | None = None, prompt_channels: int = 0,
                      **inference) -> ModelPackage:
    """Random-weight package whose windows are ``roi``×``roi`` pixels at ``spacing`` mm, made for
    ``modality``; named ``name`` (default ``tiny-<method>``). ``prompt_channels=4`` makes it an
    interactive model (clicks with a 30 mm radius unless ``click_radius_mm`` is given)."""
    m = tiny_method(method, len(TINY_ORGANS), seed, prompt_channels)
    inf = {"roi_size": [roi, roi], "overlap": 0.25, "steps": 2, "samples": 2, "sw_batch_size": 16}
    if prompt_channels:
        inf["click_radius_mm"] = 30.0
    inf.update(inference)
    return save_package(
        Path(folder), m, name=name or f"tiny-{method}", version="0.0.1", organs=TINY_ORGANS,
        preprocessing=PreprocessSpec(modality=modality, spacing=tuple(spacing)),
        inference=inf, description="tiny random-weight test model",
        provenance={"trained": False},
    )


def write_ellipsoid_ct(path: Path, shape_zyx=(6, 40, 48)) -> Path:
    """A small synthetic CT-like volume (a bright elliptic cylinder in air) with a non-trivial
    geometry (anisotropic spacing, an origin, flipped x and y), written to ``path``."""
    nz, ny, nx = shape_zyx
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    cy, cx = ny / 2.0, nx / 2.0
    arr = np.where(((x - cx) / (nx * 0.375)) ** 2 + ((y - cy) / (ny * 0.35)) ** 2 < 1, 60.0, -1000.0).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.5, 5.0))
    img.SetOrigin((-90.0, 12.5, 300.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(path))
    return Path(path)
