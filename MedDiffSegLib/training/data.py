"""Labelled volumes as 2D slices at the model's spacing, and a window sampler over them.

A labelled volume is an image (file or DICOM folder) plus a multi-label map and a name table
``{organ name: label value}`` (TotalSegmentator's CT and MR code tables differ, so the table
belongs to the dataset, not the model). The label map is brought onto the image grid
physically (nearest neighbour; identical grids stored with other axis conventions map
exactly), slices are taken in the model's canonical orientation and resampled in-plane to
the model spacing exactly as the inference engine does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..io import CanonicalView, read_volume
from ..preprocessing import PreprocessSpec, inplane_size, normalise_intensity, resample_inplane
from ..preprocessing.spec import context_indices, intensity_bounds


@dataclass
class LabelledVolume:
    name: str
    images: torch.Tensor  # [S, H, W] float32 normalised to [-1, 1], model spacing
    labels: torch.Tensor  # [S, H, W] int16 organ index + 1 (0 = background), model spacing
    organ_present: np.ndarray  # [S, O] bool: organ o has voxels on slice s
    labelled: np.ndarray  # [O] bool: the name table labels organ o (else its absence means nothing)
    context_offset: int = 1  # slices between context channels (PreprocessSpec.context_offset of its thickness)
    #: [S, O, H, W] uint8, organ o's area fraction of each model pixel × 255 (``soft_targets``), else None
    fractions: torch.Tensor | None = None


def _labels_on_image_grid(label: sitk.Image, image: sitk.Image) -> sitk.Image:
    same = (label.GetSize() == image.GetSize()
            and np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
            and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
            and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-5))
    if same:
        return label
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def load_labelled_volume(
    image_path: str | Path,
    label_path: str | Path,
    name_table: dict[str, int],
    organs: list[str],
    spec: PreprocessSpec,
    slices: tuple[int, int] | None = None,
    name: str | None = None,
    soft_targets: bool = False,
) -> LabelledVolume:
    """Load one labelled volume; ``slices=(start, stop)`` keeps a slab of canonical slices.

    ``soft_targets`` also keeps each organ's **area fraction** of every model pixel (the true mask
    downsampled with anti-aliasing, as uint8 × 255). Nearest-neighbour targets alias: taken back
    to the input grid they reach only 0.90 Dice on the adrenal glands and 0.95 on the esophagus of
    the BTCV training patients at 2 mm, the fractions 0.98 and 0.997 (``bench/measure_ceiling.py``,
    ``docs/training.md``).
    """
    image = read_volume(image_path)
    label = _labels_on_image_grid(sitk.ReadImage(str(label_path)), image)
    view = CanonicalView.from_image(image, spec.orientation)
    img = view.to_canonical(sitk.GetArrayViewFromImage(image))
    lab_src = view.to_canonical(sitk.GetArrayViewFromImage(label))
    if slices is not None:
        img, lab_src = img[slices[0]:slices[1]], lab_src[slices[0]:slices[1]]
    bounds = intensity_bounds(np.asarray(img), spec)
    # Organ index map: 0 background, i+1 for organs[i] (organs missing from the table stay 0).
    lab = np.zeros(lab_src.shape, dtype=np.int16)
    for i, organ in enumerate(organs):
        if organ in name_table:
            lab[lab_src == name_table[organ]] = i + 1
    _, sj, si = view.spacing_kji
    size = inplane_size(img.shape[1:], (sj, si), spec.spacing)
    x = normalise_intensity(torch.from_numpy(np.array(img, dtype=np.float32)), bounds)[:, None]
    x = resample_inplane(x, size)[:, 0].contiguous()
    y = resample_inplane(torch.from_numpy(lab)[:, None].float(), size, mode="nearest")[:, 0].to(torch.int16)
    present = np.stack([(y == i + 1).flatten(1).any(1).numpy() for i in range(len(organs))], axis=1)
    labelled = np.array([organ in name_table for organ in organs])
    fractions = area_fractions(lab, len(organs), size) if soft_targets else None
    return LabelledVolume(name or Path(image_path).name, x, y, present, labelled,
                          spec.context_offset(view.spacing_kji[0]), fractions)


def area_fractions(lab: np.ndarray, num_organs: int, size: tuple[int, int], slab: int = 16) -> torch.Tensor:
    """``[S, O, H, W]`` uint8: each organ's area fraction (× 255, rounded) of the pixels of a ``size`` grid.

    ``lab`` is the organ-index map ``[S, J, I]`` on the input grid (0 background, o + 1 organ o).
    Anti-aliased bilinear downsampling (a triangle filter as wide as the scale) of each organ's
    indicator, in slabs of ``slab`` slices to bound the float32 working set.
    """
    s = lab.shape[0]
    out = torch.zeros((s, num_organs, int(size[0]), int(size[1])), dtype=torch.uint8)
    for k0 in range(0, s, slab):
        part = torch.from_numpy(np.ascontiguousarray(lab[k0:k0 + slab]))
        onehot = torch.stack([(part == o + 1) for o in range(num_organs)], dim=1).float()
        f = torch.nn.functional.interpolate(onehot, size=tuple(int(v) for v in size), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[k0:k0 + slab] = (f.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return out


class SliceWindowSampler:
    """Random ``roi``×``roi`` windows with foreground oversampling.

    Each draw picks a dataset (a group of volumes) uniformly, then a volume of it uniformly
    (``groups``: lists of volume indices; default: every volume is its own group), then an
    organ prompt uniformly among the organs the volume labels; with probability
    ``foreground_fraction`` the window is centred near a random voxel of that organ (on a slice
    where it is present), else it is a random window on a random slice, where the prompted
    organ may be absent (the model must learn to answer "nothing here"). Windows beyond the
    image are padded with -1 (normalised air) and background.

    ``context_slices`` > 1 gives each window the neighbouring slices as extra channels
    (``[C,r,r]``, centre slice in the middle; see :func:`~MedDiffSegLib.preprocessing.spec.context_indices`).

    ``organ_shift`` (``(low, high)`` in normalised intensity units, or None) simulates another
    contrast phase: with probability ``organ_shift_prob`` every labelled organ in the window
    gets its own random intensity offset in that range (the same in every context slice), then
    the image is clipped back to [-1, 1] as preprocessing clips a real scan. Portal-venous CT
    seen as non-contrast has organs 50-150 HU darker; as arterial, kidneys and aorta brighter.
    """

    def __init__(self, volumes: list[LabelledVolume], num_organs: int, roi: int,
                 foreground_fraction: float = 0.67, seed: int | list[int] = 0,
                 groups: list[list[int]] | None = None, context_slices: int = 1,
                 organ_shift: tuple[float, float] | None = None, organ_shift_prob: float = 0.0):
        self.volumes, self.num_organs, self.roi = volumes, num_organs, roi
        self.fg = foreground_fraction
        self.context = int(context_slices)
        self.organ_shift = tuple(float(v) for v in organ_shift) if organ_shift else None
        self.organ_shift_prob = float(organ_shift_prob)
        self.rng = np.random.default_rng(seed)
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(volumes))]
        if not self.groups or any(not g for g in self.groups):
            raise ValueError("every group of training volumes must hold at least one volume")
        unlabelled = [v.name for v in volumes if not np.any(v.labelled)]
        if unlabelled:
            raise ValueError(f"training volume(s) label none of the model's organs: {', '.join(unlabelled)}")

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def _window(self, vol: LabelledVolume, s: int, cy: int, cx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[C,r,r]`` and organ-index labels ``[C,r,r]`` of the context slices around ``s``."""
        r, c = self.roi, self.context
        ks = torch.from_numpy(context_indices(vol.images.shape[0], s, s + 1, c, vol.context_offset)[0])
        img = torch.full((c, r, r), -1.0)
        lab = torch.zeros((c, r, r), dtype=torch.int16)
        H, W = vol.images.shape[1:]
        y0, x0 = cy - r // 2, cx - r // 2
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(H, y0 + r), min(W, x0 + r)
        img[:, ys - y0:ye - y0, xs - x0:xe - x0] = vol.images[ks, ys:ye, xs:xe]
        lab[:, ys - y0:ye - y0, xs - x0:xe - x0] = vol.labels[ks, ys:ye, xs:xe]
        return img, lab

    def _shift_organs(self, img: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        lo, hi = self.organ_shift  # type: ignore[misc]
        for value in torch.unique(lab).tolist():
            if value:
                img = torch.where(lab == value, img + float(self.rng.uniform(lo, hi)), img)
        return img.clamp_(-1.0, 1.0)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One window: image ``[C,r,r]``, mask ``[1,r,r]`` of the prompted organ (binary, or its area
        fraction for volumes loaded with ``soft_targets``), organ id."""
        group = self.groups[self.rng.integers(len(self.groups))]
        # A one-volume group draws nothing more (the stream of a volume-per-group run stays as it was).
        vol = self.volumes[group[self.rng.integers(len(group))] if len(group) > 1 else group[0]]
        organ = int(self.rng.choice(np.flatnonzero(vol.labelled)))
        S, H, W = vol.images.shape
        slices_with = np.flatnonzero(vol.organ_present[:, organ])
        jitter = self.roi // 4
        if slices_with.size and self.rng.random() < self.fg:
            s = int(self.rng.choice(slices_with))
            yy, xx = torch.nonzero(vol.labels[s] == organ + 1, as_tuple=True)
            k = int(self.rng.integers(len(yy)))
            cy = int(yy[k]) + int(self.rng.integers(-jitter, jitter + 1))
            cx = int(xx[k]) + int(self.rng.integers(-jitter, jitter + 1))
        else:
            s = int(self.rng.integers(S))
            cy = int(self.rng.integers(0, max(1, H)))
            cx = int(self.rng.integers(0, max(1, W)))
            if H <= self.roi and W <= self.roi:  # whole slice fits: centre it with jitter
                cy = H // 2 + int(self.rng.integers(-jitter, jitter + 1))
                cx = W // 2 + int(self.rng.integers(-jitter, jitter + 1))
        img, lab = self._window(vol, s, cy, cx)
        if self.organ_shift is not None and self.rng.random() < self.organ_shift_prob:
            img = self._shift_organs(img, lab)
        if vol.fractions is not None:  # soft target: the organ's area fraction of each pixel
            return img, self._fraction_window(vol, s, organ, cy, cx)[None], organ
        return img, (lab[self.context // 2] == organ + 1).float()[None], organ

    def _fraction_window(self, vol: LabelledVolume, s: int, organ: int, cy: int, cx: int) -> torch.Tensor:
        r = self.roi
        out = torch.zeros((r, r), dtype=torch.float32)
        H, W = vol.images.shape[1:]
        y0, x0 = cy - r // 2, cx - r // 2
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(H, y0 + r), min(W, x0 + r)
        out[ys - y0:ye - y0, xs - x0:xe - x0] = vol.fractions[s, organ, ys:ye, xs:xe].float() / 255.0
        return out

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [self.draw() for _ in range(n)]
        return (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]),
                torch.tensor([i[2] for i in items], dtype=torch.long))
