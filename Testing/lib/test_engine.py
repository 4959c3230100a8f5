"""The volume engine, end to end, with a deterministic test method and the real tiny packages.

``ProfileMethod`` is a test-only Method whose per-sample foreground probability is a known
function of the normalised intensity (a Gaussian bump per organ), optionally perturbed by
generator noise inside an intensity band. Everything else - canonical view, chunking,
normalisation, resampling, MONAI sliding windows, STAPLE, connected components, mapping back -
is the real engine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.errors import Cancelled, DeviceError, InputError, ModelError
from MedDiffSegLib.inference import device_description, resolve_device, segment_volume
from MedDiffSegLib.inference.engine import windows_per_slice
from MedDiffSegLib.io.geometry import CanonicalView
from MedDiffSegLib.methods.base import Method, register_method
from MedDiffSegLib.preprocessing import PreprocessSpec
from MedDiffSegLib.registry import DEFAULT_INFERENCE, ModelPackage

from tinymodels import TINY_ORGANS, make_tiny_package

# CT window (-200, 300) HU: normalised x = (HU + 200) / 250 - 1.
BACKGROUND_HU, ORGAN_HU, OTHER_HU, BAND_HU = -100.0, 200.0, 100.0, -180.0


def norm(hu: float) -> float:
    return (hu + 200.0) / 250.0 - 1.0


@register_method
class ProfileMethod(Method):
    """p_o(x) = peak_o * exp(-((x - mu_o) / width_o)^2), or sigmoid((x - mu_o) / width_o) for a "step" profile,
    plus noise * eps (eps ~ N(0,1) from the run's generator) where band_lo <= x <= band_hi (there the
    profile is replaced by ``band_base`` when the config gives one)."""

    name = "test-profile"

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("dummy", torch.zeros(1))
        self.condition_rows = 0
        self.sample_rows = 0
        self.calls = 0
        self.window_shapes = set()
        if config.get("size_multiple"):  # declares window sides' multiple: the engine may then crop to the body
            self.size_multiple = int(config["size_multiple"])

    def condition(self, images):
        self.condition_rows += images.shape[0]
        self.calls += 1
        self.window_shapes.add(tuple(images.shape[-2:]))
        return images.clone()

    def sample(self, cond, organ_ids, num_samples, steps, generator, scheduler=None):
        self.sample_rows += cond.shape[0]
        prof = self.config["profiles"]
        mu = torch.tensor([prof[i]["mu"] for i in organ_ids.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
        width = torch.tensor([prof[i]["width"] for i in organ_ids.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
        peak = torch.tensor([prof[i].get("peak", 1.0) for i in organ_ids.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
        step = torch.tensor([prof[i].get("step", False) for i in organ_ids.tolist()]).view(-1, 1, 1, 1)
        x = cond  # [B, 1, H, W]
        p = torch.where(step, torch.sigmoid((x - mu) / width), peak * torch.exp(-(((x - mu) / width) ** 2)))
        p = p.expand(-1, num_samples, -1, -1)
        noise = float(self.config.get("noise", 0.0))
        if noise:
            eps = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=p.device)
            lo, hi = self.config.get("band", (-2.0, 2.0))
            band = (x >= lo) & (x <= hi)
            base = self.config.get("band_base")
            p = torch.where(band, (p if base is None else torch.full_like(p, base)) + noise * eps, p)
        return p.clamp(0.0, 1.0).contiguous()

    def training_loss(self, images, masks, organ_ids, generator=None, stage=None):  # pragma: no cover
        raise NotImplementedError


def profile_package(tmp_path: Path, *, profiles=None, noise=0.0, band=(-2.0, 2.0), band_base=None,
                    spacing=(1.3, 0.9), orientation="LPS", size_multiple=None, **inference) -> tuple[ModelPackage, ProfileMethod]:
    # liver: a step half-way between background and organ intensity; spleen: a narrow bump.
    profiles = profiles or [{"mu": (norm(ORGAN_HU) + norm(BACKGROUND_HU)) / 2, "width": 0.03, "step": True},
                            {"mu": norm(OTHER_HU), "width": 0.05}]
    config = {"num_organs": 2, "profiles": profiles, "noise": noise, "band": list(band), "band_base": band_base,
              "size_multiple": size_multiple}
    inf = dict(DEFAULT_INFERENCE)
    inf.update({"roi_size": [16, 16], "overlap": 0.25, "samples": 3, "steps": 1, "sw_batch_size": 3})
    inf.update(inference)
    pkg = ModelPackage(
        path=tmp_path, name="test-profile-model", version="0", method_name="test-profile", config=config,
        organs=list(TINY_ORGANS), preprocessing=PreprocessSpec(modality="CT", orientation=orientation, spacing=spacing),
        inference=inf, weights_sha256="0" * 64,
    )
    return pkg, ProfileMethod(config)


def rotation(axis, degrees):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    if axis == 0:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 1:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# Input axes i, j, k run (nearly) to Anterior, Inferior, Left: a permuted, flipped, oblique grid.
OBLIQUE_DIRECTION = (rotation(2, 9) @ rotation(0, -6) @ np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)).reshape(-1)
SPACING = (0.8, 2.5, 1.1)  # i, j, k (mm)
ORIGIN = (-12.3, 45.6, 78.9)


def make_image(array_zyx: np.ndarray, spacing=SPACING, direction=OBLIQUE_DIRECTION, origin=ORIGIN) -> sitk.Image:
    img = sitk.GetImageFromArray(array_zyx.astype(np.int16))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(d) for d in direction))
    img.SetOrigin(origin)
    return img


def ellipsoid(shape_zyx, centre_zyx, radius_mm, spacing_xyz=SPACING) -> np.ndarray:
    z, y, x = np.indices(shape_zyx, dtype=np.float32)
    sx, sy, sz = spacing_xyz
    cz, cy, cx = centre_zyx
    return (((z - cz) * sz) ** 2 + ((y - cy) * sy) ** 2 + ((x - cx) * sx) ** 2) <= radius_mm**2


def sphere_volume(shape=(30, 14, 36)):
    mask = ellipsoid(shape, [s / 2 - 0.3 for s in shape], 12.0)
    arr = np.where(mask, ORGAN_HU, BACKGROUND_HU)
    return arr, mask


def assert_same_geometry(out: sitk.Image, ref: sitk.Image):
    assert out.GetSize() == ref.GetSize()
    assert out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin()
    assert out.GetDirection() == ref.GetDirection()


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (26-neighbourhood) of the mask's surface, on either side."""
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    dil = sitk.GetArrayFromImage(sitk.BinaryDilate(m, [1, 1, 1])).astype(bool)
    ero = sitk.GetArrayFromImage(sitk.BinaryErode(m, [1, 1, 1])).astype(bool)
    return dil & ~ero


# ----------------------------------------------------------------------------------------
def test_labels_match_sphere_with_exact_geometry(tmp_path):
    volume, truth = sphere_volume()
    image = make_image(volume)
    pkg, method = profile_package(tmp_path)
    view = CanonicalView.from_image(image, "LPS")
    assert not view.is_identity and view.source_axis != (0, 1, 2)  # the test really permutes/flips
    sk, sj, si = view.spacing_kji
    assert (sj, si) != tuple(pkg.preprocessing.spacing)  # in-plane resampling happens

    res = segment_volume(image, pkg, ["liver"], method=method, keep_probabilities=True)
    for img in [res.labels, res.uncertainty, *res.probabilities.values(), *res.variances.values(), *res.entropy.values()]:
        assert_same_geometry(img, image)
    assert res.labels.GetPixelID() == sitk.sitkUInt8
    assert res.uncertainty.GetPixelID() == sitk.sitkFloat32
    assert res.probabilities["liver"].GetPixelID() == sitk.sitkFloat32
    assert res.extras["windows_per_slice"] > 1  # several overlapping windows per slice

    labels = arr(res.labels)
    assert set(np.unique(labels)) == {0, 1}
    wrong = (labels == 1) != truth
    band = boundary_band(truth)
    # Only a thin boundary shell may differ (in-plane resampling to the model grid and back) ...
    assert not (wrong & ~band).any(), f"{int((wrong & ~band).sum())} mislabelled voxels away from the boundary"
    # ... and only a small part of it.
    assert wrong.sum() <= 0.15 * band.sum(), (int(wrong.sum()), int(band.sum()))
    dice = 2 * ((labels == 1) & truth).sum() / ((labels == 1).sum() + truth.sum())
    assert dice > 0.97
    # Probabilities are near 1 deep inside, near 0 far outside.
    prob = arr(res.probabilities["liver"])
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(truth.astype(np.uint8)), [2, 2, 2])).astype(bool)
    assert prob[inner].min() > 0.99
    far = ~sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(truth.astype(np.uint8)), [2, 2, 2])).astype(bool)
    assert prob[far].max() < 0.01


def test_labels_identity_geometry_and_sagittal_input(tmp_path):
    """Canonical input (no transposes) and a second, purely permuted orientation."""
    volume, truth = sphere_volume((12, 30, 34))
    for direction in (np.eye(3).reshape(-1), np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float).reshape(-1)):
        image = make_image(volume, spacing=(1.0, 1.0, 2.0), direction=direction, origin=(5.0, -3.0, 2.0))
        pkg, method = profile_package(tmp_path, spacing=(1.5, 1.5))
        res = segment_volume(image, pkg, ["liver"], method=method)
        assert_same_geometry(res.labels, image)
        labels = arr(res.labels)
        wrong = (labels == 1) != truth
        assert not (wrong & ~boundary_band(truth)).any()


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), [r, r, r])).astype(bool)


def test_variance_zero_when_samples_agree_positive_where_they_differ(tmp_path):
    volume, truth = sphere_volume()
    box = np.zeros_like(truth)
    box[0:9, 2:13, 0:10] = True
    noisy_region = box & ~dilate(truth, 1)
    volume = np.where(noisy_region, BAND_HU, volume)
    image = make_image(volume)
    band = (norm(BAND_HU) - 0.05, norm(BAND_HU) + 0.05)

    pkg, method = profile_package(tmp_path, noise=0.0, band=band)
    res = segment_volume(image, pkg, ["liver", "spleen"], method=method, keep_probabilities=True, samples=4)
    for name in ("liver", "spleen"):
        assert np.all(arr(res.variances[name]) == 0.0)
    assert np.all(arr(res.uncertainty) == 0.0)

    pkg, method = profile_package(tmp_path, noise=0.2, band=band, band_base=0.3)
    res = segment_volume(image, pkg, ["liver", "spleen"], method=method, keep_probabilities=True, samples=4)
    var = arr(res.variances["liver"])
    core = noisy_region & ~dilate(~noisy_region, 2)
    assert core.sum() > 50
    assert (var[core] > 1e-4).all()
    # Far from the noisy region the samples agree exactly.
    far = ~dilate(noisy_region, 3)
    assert far.sum() > 0.5 * far.size
    assert np.all(var[far] == 0.0)
    # Background voxels carry the max variance over organs.
    unc = arr(res.uncertainty)
    labels = arr(res.labels)
    vmax = np.maximum(var, arr(res.variances["spleen"]))
    # The per-organ maps are stored as 8-bit standard deviations (steps of 1/510): within 1e-3 in variance.
    np.testing.assert_allclose(unc[labels == 0], vmax[labels == 0], rtol=0, atol=1e-3)
    # Entropy (bits) of the mean probability: 0 where p is 0 or 1.
    ent = arr(res.entropy["liver"])
    assert ent.min() >= 0 and ent.max() <= 1
    deep_inside = ~dilate(~truth, 2)
    assert deep_inside.any()
    assert np.all(ent[far & (~dilate(truth, 2) | deep_inside)] < 0.01)
    assert ent[core].mean() > 0.5  # p near 0.3 +- noise: far from certain


def test_overlap_resolved_by_highest_mean_and_labels_follow_argument_order(tmp_path):
    # Organ "liver" (id 0) peaks at A_HU, organ "spleen" (id 1) at B_HU; each is >= 0.5 on both regions.
    a_hu, b_hu = 200.0, 260.0
    profiles = [{"mu": norm(a_hu), "width": 0.5, "peak": 0.95}, {"mu": norm(b_hu), "width": 0.5, "peak": 0.95}]
    shape = (10, 24, 30)
    volume = np.full(shape, BACKGROUND_HU)
    region_a = np.zeros(shape, bool)
    region_a[2:8, 4:20, 3:13] = True
    region_b = np.zeros(shape, bool)
    region_b[2:8, 4:20, 17:27] = True
    volume[region_a] = a_hu
    volume[region_b] = b_hu
    image = make_image(volume, spacing=(1.0, 1.0, 3.0), direction=np.diag([1.0, -1.0, 1.0]).reshape(-1))
    pkg, method = profile_package(tmp_path, profiles=profiles, spacing=(1.0, 1.0))
    res = segment_volume(image, pkg, ["spleen", "liver"], method=method, keep_probabilities=True)
    p_liver, p_spleen = arr(res.probabilities["liver"]), arr(res.probabilities["spleen"])
    inner_a = np.zeros(shape, bool)
    inner_a[3:7, 6:18, 5:11] = True
    inner_b = np.zeros(shape, bool)
    inner_b[3:7, 6:18, 19:25] = True
    # both organs claim both regions ...
    assert (p_liver[inner_a | inner_b] >= 0.5).all() and (p_spleen[inner_a | inner_b] >= 0.5).all()
    labels = arr(res.labels)
    # ... and each voxel goes to the higher mean; label 1 = spleen (named first), 2 = liver.
    assert (labels[inner_a] == 2).all()
    assert (labels[inner_b] == 1).all()
    assert [o.name for o in res.organs] == ["spleen", "liver"]
    assert [(s.name, s.label) for s in res.stats] == [("spleen", 1), ("liver", 2)]
    both = (p_liver >= 0.5) | (p_spleen >= 0.5)
    expect = np.where(both, np.where(p_liver > p_spleen, 2, 1), 0)
    np.testing.assert_array_equal(labels, expect)


def test_staple_samples_one_is_input_error(tmp_path):
    image = make_image(sphere_volume((10, 12, 12))[0])
    pkg, method = profile_package(tmp_path)
    with pytest.raises(InputError, match="STAPLE"):
        segment_volume(image, pkg, ["liver"], method=method, samples=1, staple=True)


def test_staple_through_engine(tmp_path):
    volume, truth = sphere_volume()
    image = make_image(volume)
    pkg, method = profile_package(tmp_path, noise=0.3, band=(norm(ORGAN_HU) - 0.01, norm(ORGAN_HU) + 0.01))
    res = segment_volume(image, pkg, ["liver"], method=method, samples=4, staple=True, keep_probabilities=True)
    assert res.staple
    assert_same_geometry(res.labels, image)
    labels = arr(res.labels)
    dice = 2 * ((labels == 1) & truth).sum() / ((labels == 1).sum() + truth.sum())
    assert dice > 0.9
    assert (arr(res.uncertainty)[truth & ~boundary_band(truth)] > 0).any()



@pytest.mark.parametrize("prompts", [["liver", "spleen"], ["spleen", "liver"]])
def test_staple_overlap_goes_to_the_organ_named_first_whatever_the_fusion_order(tmp_path, prompts):
    """STAPLE fuses the smallest box first (spleen here) but a tie still goes to the organ named first."""
    # liver: a step claiming everything above 50 HU; spleen: a bump claiming only the 260 HU block.
    profiles = [{"mu": norm(50.0), "width": 0.03, "step": True}, {"mu": norm(260.0), "width": 0.2}]
    shape = (10, 24, 30)
    volume = np.full(shape, BACKGROUND_HU)
    volume[1:9, 2:22, 2:28] = 200.0  # liver only
    both = np.zeros(shape, bool)
    both[3:7, 8:16, 10:18] = True
    volume[both] = 260.0  # both organs: identical samples (no noise) -> fused probability 1 for both
    image = make_image(volume, spacing=(1.0, 1.0, 3.0), direction=np.diag([1.0, -1.0, 1.0]).reshape(-1))
    pkg, method = profile_package(tmp_path, profiles=profiles, spacing=(1.0, 1.0))
    res = segment_volume(image, pkg, prompts, method=method, samples=3, staple=True)
    labels = arr(res.labels)
    inner = np.zeros(shape, bool)
    inner[4:6, 10:14, 12:16] = True
    liver_only = np.zeros(shape, bool)
    liver_only[2:8, 4:7, 4:26] = True
    assert (labels[inner] == 1).all()  # label 1 is the organ named first
    assert (labels[liver_only] == prompts.index("liver") + 1).all()
    info = {d["organ"]: d for d in res.extras["staple"]}
    assert [d["organ"] for d in res.extras["staple"]] == prompts  # reported in prompt order
    assert info["spleen"]["voxels"] < info["liver"]["voxels"]


def test_largest_component_removes_island(tmp_path):
    volume, truth = sphere_volume()
    island = np.zeros_like(truth)
    island[3:6, 1:4, 2:5] = True
    assert not (island & boundary_band(truth)).any()
    volume = np.where(island, ORGAN_HU, volume)
    image = make_image(volume)
    pkg, method = profile_package(tmp_path)
    plain = arr(segment_volume(image, pkg, ["liver"], method=method).labels)
    assert (plain[island] == 1).sum() >= island.sum() // 2
    res = segment_volume(image, pkg, ["liver"], method=method, largest_component=True)
    kept = arr(res.labels)
    assert not (kept[island] == 1).any()
    np.testing.assert_array_equal(kept[~island], plain[~island])
    assert res.stats[0].voxel_count == int((kept == 1).sum()) < int((plain == 1).sum())


def test_the_package_chooses_largest_component_per_organ(tmp_path):
    volume, truth = sphere_volume()
    island = np.zeros_like(truth)
    island[3:6, 1:4, 2:5] = True
    volume = np.where(island, ORGAN_HU, volume)
    image = make_image(volume)
    pkg, method = profile_package(tmp_path, largest_component=["liver"])
    plain = arr(segment_volume(image, pkg, ["liver"], method=method, largest_component=False).labels)
    assert (plain[island] == 1).any()
    chosen = segment_volume(image, pkg, ["liver"], method=method)  # None: the package's choice
    assert not (arr(chosen.labels)[island] == 1).any()
    assert chosen.extras["largest_component_organs"] == ["liver"] and chosen.largest_component
    # an organ the package did not choose is left as it is
    pkg2, method2 = profile_package(tmp_path, largest_component=["spleen"])
    np.testing.assert_array_equal(arr(segment_volume(image, pkg2, ["liver"], method=method2).labels), plain)
    pkg3, method3 = profile_package(tmp_path, largest_component=["kidney"])
    with pytest.raises(ModelError, match="does not know"):
        segment_volume(image, pkg3, ["liver"], method=method3)


def test_cancel_and_progress(tmp_path):
    image = make_image(sphere_volume()[0])
    pkg, method = profile_package(tmp_path)
    calls = {"n": 0}

    def cancel_on_second_poll():
        calls["n"] += 1
        return calls["n"] >= 2

    with pytest.raises(Cancelled):
        segment_volume(image, pkg, ["liver"], method=method, should_cancel=cancel_on_second_poll)
    assert method.calls <= 1  # stopped within a window batch of being asked

    seen = []
    segment_volume(image, pkg, ["liver"], method=method, progress=lambda s, f, m: seen.append((s, f, m)),
                   should_cancel=lambda: False)
    fractions = [f for _, f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {s for s, _, _ in seen} >= {"preprocess", "network", "postprocess"}


@pytest.mark.parametrize("kwargs, error, text", [
    ({"samples": 0}, InputError, "samples"),
    ({"steps": 0}, InputError, "steps"),
    ({"samples": -2}, InputError, "samples"),
    ({"chunk_slices": 0}, InputError, "chunk_slices"),
    ({"seed": -1}, InputError, "seed"),
])
def test_bad_arguments(tmp_path, kwargs, error, text):
    image = make_image(sphere_volume((6, 10, 10))[0])
    pkg, method = profile_package(tmp_path)
    with pytest.raises(error, match=text):
        segment_volume(image, pkg, ["liver"], method=method, **kwargs)


def test_bad_package_overlap_and_unknown_organ(tmp_path):
    image = make_image(sphere_volume((6, 10, 10))[0])
    pkg, method = profile_package(tmp_path, overlap=0.8)
    with pytest.raises(ModelError, match="overlap"):
        segment_volume(image, pkg, ["liver"], method=method)
    pkg, method = profile_package(tmp_path, overlap=0.5)
    segment_volume(image, pkg, ["liver"], method=method)  # 0.5 is the largest allowed
    with pytest.raises(ModelError) as exc:
        segment_volume(image, pkg, ["liver", "pancreas"], method=method)
    assert "pancreas" in str(exc.value) and "liver" in str(exc.value) and "spleen" in str(exc.value)


def test_bad_images(tmp_path):
    pkg, method = profile_package(tmp_path)
    with pytest.raises(InputError, match="3D"):
        segment_volume(sitk.Image(10, 10, sitk.sitkInt16), pkg, ["liver"], method=method)
    with pytest.raises(InputError, match="scalar"):
        segment_volume(sitk.Image([8, 8, 4], sitk.sitkVectorFloat32, 3), pkg, ["liver"], method=method)


def test_stats_volume_and_max_uncertainty_slice(tmp_path):
    shape = (16, 20, 22)
    volume, truth = sphere_volume(shape)
    image = make_image(volume)
    view = CanonicalView.from_image(image, "LPS")
    axis, _ = view.input_index_of_canonical_slice(0)
    target = 4
    patch = np.zeros(shape, bool)
    sl = [slice(6, 12)] * 3
    sl[axis] = slice(target, target + 1)
    patch[tuple(sl)] = True
    patch &= ~truth
    assert patch.sum() >= 20
    volume = np.where(patch, BAND_HU, volume)
    image = make_image(volume)
    band = (norm(BAND_HU) - 0.05, norm(BAND_HU) + 0.05)
    pkg, method = profile_package(tmp_path, noise=0.3, band=band, band_base=0.3)
    res = segment_volume(image, pkg, ["liver"], method=method, samples=4)
    st = res.stats[0]
    labels = arr(res.labels)
    count = int((labels == 1).sum())
    assert st.voxel_count == count > 0
    assert st.volume_ml == pytest.approx(count * np.prod(SPACING) / 1000.0, rel=1e-12)
    assert st.slice_axis == axis
    assert st.max_uncertainty_slice == target
    # Its position is the physical centre of that input slice.
    idx = [(n - 1) / 2 for n in image.GetSize()]
    idx[2 - axis] = target
    np.testing.assert_allclose(st.max_uncertainty_position, image.TransformContinuousIndexToPhysicalPoint(idx), atol=1e-9)
    unc = arr(res.uncertainty)
    assert st.mean_uncertainty == pytest.approx(float(unc[labels == 1].mean()), rel=1e-5)
    d = res.to_dict()
    assert d["organs"][0]["max_uncertainty_slice"] == target and d["samples"] == 4


def test_empty_organ_stats(tmp_path):
    image = make_image(np.full((6, 12, 12), BACKGROUND_HU))
    pkg, method = profile_package(tmp_path)
    res = segment_volume(image, pkg, ["liver"], method=method)
    assert res.stats[0].voxel_count == 0 and res.stats[0].mean_uncertainty is None
    assert res.stats[0].max_uncertainty_slice is None  # no variance anywhere: no slice stands out
    assert not arr(res.labels).any()


def test_window_encoded_once_per_batch_and_all_organs_sampled(tmp_path):
    shape = (7, 14, 36)
    image = make_image(sphere_volume(shape)[0])
    pkg, method = profile_package(tmp_path)
    res = segment_volume(image, pkg, ["liver", "spleen"], method=method, adaptive=False)
    view = CanonicalView.from_image(image, "LPS")
    n_win = res.extras["windows_per_slice"]
    assert n_win == windows_per_slice(tuple(res.extras["model_inplane_size"]), (16, 16), 0.25)
    windows = view.shape_kji[0] * n_win
    assert method.condition_rows == windows  # each window encoded exactly once
    assert method.sample_rows == 2 * windows  # ... and reused for both organs
    assert method.calls == math.ceil(windows / 3)  # batches of sw_batch_size
    sampling = res.extras["sampling"]
    assert sampling["windows"] == windows and sampling["windows_outside_body"] == 0 and not sampling["adaptive"]
    assert all(o["samples_drawn"] == 3 * windows and o["samples_per_window"] == 3 for o in sampling["organs"].values())


def _organ_in_some_slices(shape=(24, 14, 36)):
    """An organ block in the middle third of the slices (axis 0 is the canonical axial axis for the
    plain LPS grid used here), background elsewhere."""
    volume = np.full(shape, BACKGROUND_HU)
    truth = np.zeros(shape, bool)
    truth[8:16, 3:11, 6:30] = True
    volume[truth] = ORGAN_HU
    return volume, truth


def test_adaptive_sampling_spends_samples_where_the_organ_is(tmp_path):
    volume, truth = _organ_in_some_slices()
    image = make_image(volume, spacing=(1.3, 0.9, 2.0), direction=np.eye(3).reshape(-1))
    runs = {}
    for adaptive in (False, True):
        pkg, method = profile_package(tmp_path, samples=5)
        res = segment_volume(image, pkg, ["liver"], method=method, adaptive=adaptive, keep_probabilities=True)
        runs[adaptive] = (res, method.sample_rows)
    (full, full_rows), (adapt, adapt_rows) = runs[False], runs[True]
    # a noiseless method: stopping early changes no label and no probability
    np.testing.assert_array_equal(arr(adapt.labels), arr(full.labels))
    np.testing.assert_array_equal(arr(adapt.probabilities["liver"]), arr(full.probabilities["liver"]))
    assert (arr(adapt.labels) == 1).sum() == truth.sum()
    info = adapt.extras["sampling"]
    organ = info["organs"]["liver"]
    windows = info["windows"]
    assert info["adaptive"] and info["samples_requested"] == 5
    # the windows of the organ's slices get all 5 samples, the others stop after the first
    assert 0 < organ["windows_with_all_samples"] < windows
    # rows the network sampled: every window once, then the organ's windows once more (4 samples each)
    assert adapt_rows == windows + organ["windows_with_all_samples"] and full_rows == windows
    assert organ["samples_drawn"] == windows + 4 * organ["windows_with_all_samples"] < 0.6 * 5 * windows
    assert full.extras["sampling"]["organs"]["liver"]["samples_drawn"] == 5 * windows
    assert organ["samples_per_window"] == pytest.approx(organ["samples_drawn"] / windows, abs=1e-3)


def test_adaptive_sampling_keeps_the_variance_where_the_organ_is(tmp_path):
    volume, truth = _organ_in_some_slices()
    image = make_image(volume, spacing=(1.3, 0.9, 2.0), direction=np.eye(3).reshape(-1))
    # noisy samples in the organ's intensity band only: far from the organ every sample is ~0
    pkg, method = profile_package(tmp_path, samples=6, noise=0.2, band=(norm(ORGAN_HU) - 0.1, norm(ORGAN_HU) + 0.1))
    res = segment_volume(image, pkg, ["liver"], method=method, keep_probabilities=True)
    var = arr(res.variances["liver"])
    ref = arr(segment_volume(image, pkg, ["liver"], method=method, keep_probabilities=True,
                             adaptive=False).variances["liver"])
    # in the organ all 6 samples are drawn either way: the same variance up to the noise of the estimate
    assert var[truth].mean() > 0.005 and var[truth].mean() == pytest.approx(ref[truth].mean(), rel=0.15)
    stopped = np.zeros_like(truth)
    stopped[:4] = stopped[-4:] = True  # slices whose windows are far from the organ
    assert float(var[stopped].max()) == 0.0  # one sample there, and it says "no organ": no variance
    assert 0 < res.extras["sampling"]["organs"]["liver"]["windows_with_all_samples"] < res.extras["sampling"]["windows"]


def test_a_package_sets_the_adaptive_floor_above_its_decoded_background(tmp_path):
    """A model trained on soft targets decodes a constant background (abdomen-ct 2.0.0: 0.012): the
    default floor (0.01) takes it for the organ everywhere; the package's inference.adaptive_floor does not."""
    volume, truth = _organ_in_some_slices()
    image = make_image(volume, spacing=(1.3, 0.9, 2.0), direction=np.eye(3).reshape(-1))

    def with_background(method, level=0.012):
        plain = method.sample

        def sample(*args, **kwargs):
            return level + (1.0 - level) * plain(*args, **kwargs)
        method.sample = sample
        return method

    runs = {}
    for floor in (None, 0.02):
        extra = {} if floor is None else {"adaptive_floor": floor}
        pkg, method = profile_package(tmp_path, samples=5, **extra)
        res = segment_volume(image, pkg, ["liver"], method=with_background(method), keep_probabilities=True)
        runs[floor] = res
    windows = runs[None].extras["sampling"]["windows"]
    default, floored = (runs[f].extras["sampling"]["organs"]["liver"] for f in (None, 0.02))
    assert default["windows_with_all_samples"] == windows and default["samples_drawn"] == 5 * windows
    assert 0 < floored["windows_with_all_samples"] < windows  # only the organ's windows get all 5
    np.testing.assert_array_equal(arr(runs[0.02].labels), arr(runs[None].labels))
    assert (arr(runs[0.02].labels) == 1).sum() == truth.sum()
    for bad in (0.5, 0.9, -0.1, "0.02", True):
        pkg, method = profile_package(tmp_path, adaptive_floor=bad)
        with pytest.raises(ModelError, match="adaptive_floor"):
            segment_volume(image, pkg, ["liver"], method=method, samples=2)
        assert method.sample_rows == 0  # refused before any network call


def test_windows_outside_the_body_are_not_sent_to_the_network(tmp_path):
    volume, truth = _organ_in_some_slices()
    volume[:5] = -1000.0  # air slices (below the window's floor)
    volume[-3:] = -1000.0
    image = make_image(volume, spacing=(1.3, 0.9, 2.0), direction=np.eye(3).reshape(-1))
    # a method that (wrongly) sees "spleen" in air: the skipped windows must still say background
    pkg, method = profile_package(tmp_path, profiles=[
        {"mu": (norm(ORGAN_HU) + norm(BACKGROUND_HU)) / 2, "width": 0.03, "step": True}, {"mu": -1.0, "width": 0.05}])
    res = segment_volume(image, pkg, ["liver", "spleen"], method=method, samples=1)
    info = res.extras["sampling"]
    per_slice = res.extras["windows_per_slice"]
    assert info["windows_outside_body"] == 8 * per_slice
    assert method.condition_rows == info["windows"] - 8 * per_slice  # never encoded
    labels = arr(res.labels)
    assert not labels[:5].any() and not labels[-3:].any()  # nothing in air, though the method would say spleen
    assert (labels == 1).sum() == truth.sum()
    assert float(arr(res.uncertainty)[:5].max()) == 0.0
    # a slice with one voxel inside the window is not skipped
    volume[2, 7, 18] = -50.0
    pkg, method = profile_package(tmp_path)
    res = segment_volume(make_image(volume, spacing=(1.3, 0.9, 2.0), direction=np.eye(3).reshape(-1)), pkg, ["liver"],
                         method=method, samples=1)
    assert res.extras["sampling"]["windows_outside_body"] < 8 * per_slice


def _body_in_air(shape=(6, 48, 64)):
    """Air (-1000 HU) around a body block (rows 10-29, columns 20-43, background HU) holding an organ
    block (rows 14-23, columns 26-37); 1 mm pixels, so the model grid (1 mm) is the input grid."""
    volume = np.full(shape, -1000.0)
    volume[:, 10:30, 20:44] = BACKGROUND_HU
    truth = np.zeros(shape, bool)
    truth[:, 14:24, 26:38] = True
    volume[truth] = ORGAN_HU
    return make_image(volume, spacing=(1.0, 1.0, 2.0), direction=np.eye(3).reshape(-1)), truth


def test_windows_are_cut_to_the_body(tmp_path):
    image, truth = _body_in_air()
    runs = {}
    for crop in (True, False):
        pkg, method = profile_package(tmp_path, spacing=(1.0, 1.0), size_multiple=8, roi_size=[48, 48], samples=1,
                                      noise=0.0)
        runs[crop] = (segment_volume(image, pkg, ["liver"], method=method, crop_body=crop, keep_probabilities=True), method)
    (cut, m_cut), (whole, m_whole) = runs[True], runs[False]
    info = cut.extras["sampling"]
    # body rows 10..29 and columns 20..43 plus 8 px of air: 36 x 40 pixels, windows rounded up to 8: 40 x 40
    assert info["window_hw"] == [40, 40] and m_cut.window_shapes == {(40, 40)}
    (r0, r1), (c0, c1) = info["body_box"]
    assert (r1 - r0, c1 - c0) == (40, 40) and r0 <= 2 and r1 >= 38 and c0 <= 12 and c1 >= 52
    assert info["windows"] == 6 and cut.extras["model_inplane_size"] == [48, 64]  # one window per slice
    assert whole.extras["sampling"]["window_hw"] == [48, 48] and whole.extras["sampling"]["body_box"] is None
    assert m_whole.window_shapes == {(48, 48)} and whole.extras["sampling"]["windows"] == 6 * 2
    # a per-pixel method gives the same answer either way; the geometry is the input's
    assert_same_geometry(cut.labels, image)
    np.testing.assert_array_equal(arr(cut.labels), arr(whole.labels))
    assert (arr(cut.labels) == 1).sum() == truth.sum()
    np.testing.assert_allclose(arr(cut.probabilities["liver"]), arr(whole.probabilities["liver"]), atol=1e-6)


def test_body_crop_keeps_chunking_invariance_and_zeroes_outside_the_box(tmp_path):
    image, truth = _body_in_air()
    band = (norm(ORGAN_HU) - 0.01, norm(ORGAN_HU) + 0.01)
    # "spleen" peaks in air: inside the box's air margin the method says so, outside the box nothing may
    pkg, _ = profile_package(tmp_path, spacing=(1.0, 1.0), size_multiple=8, roi_size=[48, 48], samples=3, noise=0.25,
                             band=band, profiles=[{"mu": (norm(ORGAN_HU) + norm(BACKGROUND_HU)) / 2, "width": 0.03,
                                                   "step": True}, {"mu": -1.0, "width": 0.05}])
    runs = [segment_volume(image, pkg, ["liver", "spleen"], method=ProfileMethod(pkg.config), chunk_slices=c,
                           keep_probabilities=True, crop_body=True) for c in (None, 1)]
    for name in ("liver", "spleen"):
        np.testing.assert_array_equal(arr(runs[0].probabilities[name]), arr(runs[1].probabilities[name]))
    np.testing.assert_array_equal(arr(runs[0].uncertainty), arr(runs[1].uncertainty))
    assert arr(runs[0].uncertainty).max() > 0
    (r0, r1), (c0, c1) = runs[0].extras["sampling"]["body_box"]
    spleen = arr(runs[0].probabilities["spleen"])
    outside = np.ones(spleen.shape, bool)
    outside[:, r0:r1, c0:c1] = False
    assert spleen[:, r0:r1, c0:c1].max() > 0.5 and float(spleen[outside].max()) == 0.0


def test_body_crop_is_the_packages_choice_by_default(tmp_path):
    image, _ = _body_in_air()
    for declared, expected in ((None, [48, 48]), (False, [48, 48]), (True, [40, 40])):
        extra = {} if declared is None else {"body_crop": declared}
        pkg, method = profile_package(tmp_path, spacing=(1.0, 1.0), size_multiple=8, roi_size=[48, 48], samples=1, **extra)
        res = segment_volume(image, pkg, ["liver"], method=method)
        assert res.extras["sampling"]["window_hw"] == expected, declared
    pkg, method = profile_package(tmp_path, size_multiple=8, body_crop="yes")
    with pytest.raises(ModelError, match="body_crop must be true or false"):
        segment_volume(image, pkg, ["liver"], method=method)
    # a method that declares no size multiple keeps its windows whatever is asked
    pkg, method = profile_package(tmp_path, spacing=(1.0, 1.0), roi_size=[48, 48], samples=1)
    res = segment_volume(image, pkg, ["liver"], method=method, crop_body=True)
    assert res.extras["sampling"]["window_hw"] == [48, 48] and res.extras["sampling"]["body_box"] is None


def test_body_box_rules():
    from MedDiffSegLib.inference.engine import body_box

    bounds = (-200.0, 300.0)
    canon = np.full((4, 48, 64), -1000.0, dtype=np.float32)
    assert body_box(canon, bounds, (48, 64), (48, 48), 8) is None  # all air: nothing to cut to
    canon[2, 20, 30] = 0.0  # one voxel on one slice is body: the box holds it (with the margin)
    (r0, r1), (c0, c1) = body_box(canon, bounds, (48, 64), (48, 48), 8, margin=4)[0]
    assert r0 <= 16 and r1 >= 25 and c0 <= 26 and c1 >= 35
    # at half the resolution the box is on the model grid (24 x 32) and still holds the voxel
    box, window = body_box(canon, bounds, (24, 32), (16, 16), 8, margin=0)
    assert box[0][0] <= 10 < box[0][1] and box[1][0] <= 15 < box[1][1] and window == (8, 8)
    canon[:] = 0.0  # body everywhere: the whole slice and the model's windows
    assert body_box(canon, bounds, (48, 64), (48, 48), 8) is None


def test_streaming_chunks_do_not_change_results(tmp_path):
    shape = (30, 14, 36)
    volume, truth = sphere_volume(shape)
    image = make_image(volume)
    band = (norm(ORGAN_HU) - 0.01, norm(ORGAN_HU) + 0.01)
    pkg, _ = profile_package(tmp_path, noise=0.25, band=band)

    def run(chunk, method_seed=5):
        m = ProfileMethod(pkg.config)
        r = segment_volume(image, pkg, ["liver", "spleen"], method=m, seed=method_seed, chunk_slices=chunk,
                           keep_probabilities=True)
        return r

    big = run(None)
    n_k = CanonicalView.from_image(image, "LPS").shape_kji[0]
    assert big.chunk_slices == n_k  # one chunk under the default budget
    for chunk in (1, 2, 7):
        small = run(chunk)
        assert 1 < math.ceil(n_k / small.chunk_slices)
        np.testing.assert_array_equal(arr(small.labels), arr(big.labels))
        np.testing.assert_array_equal(arr(small.uncertainty), arr(big.uncertainty))
        for name in ("liver", "spleen"):
            np.testing.assert_array_equal(arr(small.probabilities[name]), arr(big.probabilities[name]))
    assert arr(big.uncertainty).max() > 0  # the noise really is there
    other = run(None, method_seed=6)
    assert not np.array_equal(arr(other.uncertainty), arr(big.uncertainty))


def test_staple_streaming_and_mr_normalisation(tmp_path):
    """STAPLE path with chunks equals one chunk; an MR package uses volume percentiles."""
    volume, truth = sphere_volume((20, 14, 30))
    image = make_image(volume + 150)  # MR-like: positive intensities (50 and 350)
    pkg, _ = profile_package(tmp_path, noise=0.3, band=(0.95, 1.0))
    pkg.preprocessing = PreprocessSpec(modality="MR", spacing=(1.3, 0.9), mr_percentiles=(1.0, 99.0))
    # MR: clip to the 1st/99th percentile (0 -> organ -> +1 after normalisation): a step at the middle.
    pkg.config["profiles"][0] = {"mu": 0.0, "width": 0.03, "step": True}
    runs = [segment_volume(image, pkg, ["liver"], method=ProfileMethod(pkg.config), samples=3, staple=True,
                           chunk_slices=c, seed=3) for c in (None, 2)]
    assert runs[0].extras["intensity_bounds"] == [50.0, 350.0]
    np.testing.assert_array_equal(arr(runs[0].labels), arr(runs[1].labels))
    np.testing.assert_array_equal(arr(runs[0].uncertainty), arr(runs[1].uncertainty))
    assert runs[1].chunk_slices < runs[0].chunk_slices
    assert arr(runs[0].uncertainty).max() > 0  # the samples really differ
    labels = arr(runs[0].labels)
    assert not (((labels == 1) != truth) & ~boundary_band(truth)).any()


class BrokenMethod(ProfileMethod):
    name = ""  # not registered

    def sample(self, cond, organ_ids, num_samples, steps, generator, scheduler=None):
        p = super().sample(cond, organ_ids, num_samples, steps, generator, scheduler)
        if self.config.get("break") == "shape":
            return p[:, :-1]  # one sample short
        return p * float("nan")


@pytest.mark.parametrize("how, text", [("shape", "shape"), ("nan", "non-finite")])
def test_misbehaving_method_is_reported(tmp_path, how, text):
    image = make_image(sphere_volume((6, 10, 10))[0])
    pkg, _ = profile_package(tmp_path)
    with pytest.raises(ModelError, match=text):
        segment_volume(image, pkg, ["liver"], method=BrokenMethod({**pkg.config, "break": how}), samples=2)


def test_memory_budget_bounds_chunk(tmp_path, monkeypatch):
    image = make_image(sphere_volume((30, 14, 36))[0])
    pkg, method = profile_package(tmp_path)
    monkeypatch.setenv("MEDDIFFSEG_CHUNK_MB", "0.05")
    res = segment_volume(image, pkg, ["liver"], method=method)
    n_k = CanonicalView.from_image(image, "LPS").shape_kji[0]
    assert res.chunk_slices < n_k


# ---- device ------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(DeviceError):
        resolve_device("cuda:x")
    assert "thread" in device_description(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_cuda_without_cuda():
    with pytest.raises(DeviceError, match="CUDA is not available") as exc:
        resolve_device("cuda")
    assert "CUDA support" in str(exc.value) or "GPU" in str(exc.value)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda:1")


# ---- real tiny packages --------------------------------------------------------------------
@pytest.mark.parametrize("method_name", ["guided", "sdseg"])
def test_tiny_package_seed_determinism_and_chunking(tmp_path, method_name):
    pkg = make_tiny_package(tmp_path / "pkg", method_name, roi=32, spacing=(6.0, 6.0))
    volume, _ = sphere_volume((9, 40, 50))
    image = make_image(volume, spacing=(4.0, 5.0, 3.0))
    kw = dict(samples=2, steps=2, keep_probabilities=True)
    a = segment_volume(image, pkg, ["spleen", "liver"], seed=11, **kw)  # loads + verifies the package
    method = pkg.load_method("cpu")
    b = segment_volume(image, pkg, ["spleen", "liver"], seed=11, method=method, chunk_slices=1, **kw)
    c = segment_volume(image, pkg, ["spleen", "liver"], seed=12, method=method, **kw)
    for img in (a.labels, a.uncertainty, *a.probabilities.values()):
        assert_same_geometry(img, image)
    np.testing.assert_array_equal(arr(a.labels), arr(b.labels))
    np.testing.assert_array_equal(arr(a.uncertainty), arr(b.uncertainty))
    for name in ("spleen", "liver"):
        np.testing.assert_array_equal(arr(a.probabilities[name]), arr(b.probabilities[name]))
    assert not np.array_equal(arr(a.probabilities["liver"]), arr(c.probabilities["liver"]))
    assert a.samples == 2 and a.steps == 2 and a.seed == 11 and a.device == "cpu"
    assert set(a.timings) >= {"preprocess", "network", "postprocess"}


# ---- issue 13: variance across windows, prompt independence, missed structure -------------------

class UniformNoiseMethod(Method):
    """Every sample of every organ is U(0, 1) noise from the generator: per-sample variance exactly 1/12."""

    name = "test-uniform-noise"

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("dummy", torch.zeros(1))

    def condition(self, images):
        return images

    def sample(self, cond, organ_ids, num_samples, steps, generator, scheduler=None):
        b, _, h, w = cond.shape
        return torch.rand((b, num_samples, h, w), generator=generator, dtype=torch.float32)

    def training_loss(self, images, masks, organ_ids, generator=None, stage=None):  # pragma: no cover
        raise NotImplementedError


register_method(UniformNoiseMethod)


def test_variance_is_the_same_in_window_seams_as_inside_windows(tmp_path):
    """Blending samples that drew independent noise per window would halve the variance where
    windows overlap (~0.042 instead of 1/12) and draw a grid on the overlay; the engine blends
    per-window moments instead, so the map is flat."""
    pkg, _ = profile_package(tmp_path, overlap=0.5, samples=48, sw_batch_size=4)
    pkg.method_name = "test-uniform-noise"
    image = make_image(np.full((6, 20, 52), 100.0), spacing=(1.0, 1.0, 2.0), direction=np.eye(3).reshape(-1))
    res = segment_volume(image, pkg, ["liver"], method=UniformNoiseMethod({"num_organs": 2}), keep_probabilities=True)
    assert res.extras["windows_per_slice"] > 4  # overlapping windows along both in-plane axes
    var = arr(res.uncertainty)
    expected = (1.0 / 12.0) * (48 - 1) / 48  # population variance of 48 draws
    # Column and row means over all slices: windows overlap in bands of columns and rows.
    for axis in ((0, 1), (0, 2)):
        profile = var.mean(axis=axis)
        assert np.all(np.abs(profile / expected - 1.0) < 0.1), profile / expected
    np.testing.assert_allclose(arr(res.probabilities["liver"]).mean(), 0.5, atol=0.01)


@pytest.mark.parametrize("method_name", ["guided", "sdseg"])
def test_organ_result_does_not_depend_on_other_prompts(tmp_path, method_name):
    """liver's samples depend on the seed, the organ and the image only: bit-identical on CPU
    whether it is prompted alone, first or after another organ (overlaps are resolved after sampling)."""
    pkg = make_tiny_package(tmp_path / "pkg", method_name, roi=32, spacing=(6.0, 6.0))
    volume, _ = sphere_volume((6, 40, 50))
    image = make_image(volume, spacing=(4.0, 5.0, 3.0))
    method = pkg.load_method("cpu")
    kw = dict(samples=3, steps=2, seed=7, method=method, keep_probabilities=True)
    alone = segment_volume(image, pkg, ["liver"], **kw)
    after = segment_volume(image, pkg, ["spleen", "liver"], **kw)
    first = segment_volume(image, pkg, ["liver", "spleen"], **kw)
    for other in (after, first):
        for kind in ("probabilities", "variances"):
            np.testing.assert_array_equal(arr(getattr(other, kind)["liver"]), arr(getattr(alone, kind)["liver"]))
    # The float32 uncertainty of voxels labelled liver in both runs is the liver's own variance: equal bit for bit.
    liver_alone = arr(alone.labels) == 1
    liver_after = arr(after.labels) == 2
    both = liver_alone & liver_after
    assert both.any()
    np.testing.assert_array_equal(arr(after.uncertainty)[both], arr(alone.uncertainty)[both])
    # ... and an organ's stream is not the run's stream shifted: spleen and liver differ for the same seed.
    assert arr(after.variances["spleen"]).tobytes() != arr(after.variances["liver"]).tobytes()


def test_profile_method_prompt_independence_with_noise(tmp_path):
    volume, _ = sphere_volume((20, 14, 36))
    image = make_image(volume)
    band = (norm(ORGAN_HU) - 0.01, norm(ORGAN_HU) + 0.01)
    pkg, method = profile_package(tmp_path, noise=0.25, band=band)
    alone = segment_volume(image, pkg, ["spleen"], method=method, seed=3, keep_probabilities=True)
    both = segment_volume(image, pkg, ["liver", "spleen"], method=method, seed=3, keep_probabilities=True)
    np.testing.assert_array_equal(arr(both.variances["spleen"]), arr(alone.variances["spleen"]))
    assert arr(alone.variances["spleen"]).max() > 0


def test_missed_slices_beyond_the_mask_are_reported(tmp_path):
    """An organ that continues for four slices with a sub-threshold probability (p = 0.3):
    the summary names those slices, on the right side, and the peak slice's position."""
    z, y, x = np.indices((24, 40, 40))
    disc = (y - 20) ** 2 + (x - 20) ** 2 <= 12 ** 2  # 452 mm² at 1 mm: 136 mm² of p = 0.3
    organ = disc & (z >= 4) & (z <= 14)
    faint = disc & (z >= 15) & (z <= 18)
    mu = (norm(ORGAN_HU) + norm(BACKGROUND_HU)) / 2
    faint_hu = ((mu + 0.03 * math.log(0.3 / 0.7)) + 1.0) * 250.0 - 200.0  # liver's step profile gives p = 0.3
    volume = np.where(organ, ORGAN_HU, np.where(faint, faint_hu, BACKGROUND_HU))
    image = make_image(volume, spacing=(1.0, 1.0, 2.5), direction=np.eye(3).reshape(-1))  # z runs to S
    pkg, method = profile_package(tmp_path, spacing=(1.0, 1.0))
    res = segment_volume(image, pkg, ["liver"], method=method)
    assert arr(res.labels)[organ].all() and not arr(res.labels)[faint].any()
    runs = res.stats[0].possible_continuation
    assert len(runs) == 1, runs
    run = runs[0]
    assert run["kind"] == "beyond_mask" and run["side"] == "superior"
    assert run["slices"] == [15, 16, 17, 18]
    assert run["extent_mm"] == pytest.approx(10.0)
    assert run["peak_slice"] in run["slices"]
    assert run["peak_position_mm"][2] == pytest.approx(image.TransformIndexToPhysicalPoint((0, 0, run["peak_slice"]))[2])
    # Without the faint extension nothing is reported.
    clean = segment_volume(make_image(np.where(organ, ORGAN_HU, BACKGROUND_HU), spacing=(1.0, 1.0, 2.5),
                                      direction=np.eye(3).reshape(-1)), pkg, ["liver"], method=method)
    assert clean.stats[0].possible_continuation == []


def test_calibrated_package_reports_softened_probabilities_with_the_same_labels(tmp_path):
    volume, _ = sphere_volume((12, 14, 36))
    image = make_image(volume)
    band = (norm(ORGAN_HU) - 0.01, norm(ORGAN_HU) + 0.01)
    pkg, method = profile_package(tmp_path, noise=0.25, band=band)
    raw = segment_volume(image, pkg, ["liver", "spleen"], method=method, seed=2, keep_probabilities=True)
    pkg.inference["calibration"] = {"method": "temperature", "temperature": {"liver": 2.0}}
    cal = segment_volume(image, pkg, ["liver", "spleen"], method=method, seed=2, keep_probabilities=True)
    np.testing.assert_array_equal(arr(cal.labels), arr(raw.labels))
    np.testing.assert_array_equal(arr(cal.uncertainty), arr(raw.uncertainty))
    np.testing.assert_array_equal(arr(cal.probabilities["spleen"]), arr(raw.probabilities["spleen"]))
    p_raw, p_cal = arr(raw.probabilities["liver"]), arr(cal.probabilities["liver"])
    sure = p_raw > 0.9
    assert sure.any() and np.all(p_cal[sure] < p_raw[sure])  # softened towards 0.5
    assert cal.extras["calibration"] == {"liver": 2.0} and raw.extras["calibration"] is None
    assert stats_continuations_equal(raw, cal)


def stats_continuations_equal(a, b) -> bool:
    return [s.possible_continuation for s in a.stats] == [s.possible_continuation for s in b.stats]


def test_chunk_budget_shrinks_when_whole_volume_arrays_are_large(monkeypatch):
    from MedDiffSegLib.inference import engine

    monkeypatch.delenv("MEDDIFFSEG_CHUNK_MB", raising=False)
    assert engine._memory_budget(0) == engine.DEFAULT_CHUNK_MEMORY
    small = engine._volume_bytes(512 * 512 * 200, 1, 1, staple=False, keep_probabilities=False, largest_component=False)
    assert small == 512 * 512 * 200 * 5 and engine._memory_budget(small) == engine.DEFAULT_CHUNK_MEMORY
    big = engine._volume_bytes(512 * 512 * 300, 8, 10, staple=True, keep_probabilities=True, largest_component=False)
    assert big == 512 * 512 * 300 * (5 + 8 + 8 + 10)
    assert engine._memory_budget(big) == engine.MIN_CHUNK_MEMORY
    mid = engine.VOLUME_MEMORY_ALLOWANCE + (300 << 20)
    assert engine._memory_budget(mid) == engine.DEFAULT_CHUNK_MEMORY - (300 << 20)
    monkeypatch.setenv("MEDDIFFSEG_CHUNK_MB", "64")
    assert engine._memory_budget(big) == 64 << 20  # an explicit budget is taken as given


@pytest.mark.parametrize("context", [1, 3])
def test_chunk_input_equals_resampling_every_context_channel(context):
    """Each slice is normalised and resampled once and the context gathered afterwards: bit for bit
    what resampling the [k, C, J, I] stack of context slices gives, at the volume's edges too."""
    from MedDiffSegLib.inference.engine import _chunk_input
    from MedDiffSegLib.preprocessing.spec import context_indices, normalise_intensity, resample_inplane

    spec = PreprocessSpec(modality="CT", spacing=(2.0, 2.0), context_slices=context, context_spacing_mm=3.0)
    canon = np.random.default_rng(3).integers(-1024, 1500, (11, 60, 52)).astype(np.int16)
    before = canon.copy()
    bounds = (-125.0, 275.0)
    for k0, k1 in ((0, 4), (4, 9), (9, 11), (5, 6)):
        got = _chunk_input(canon, k0, k1, spec, 1.5, bounds, (29, 25), torch.device("cpu"))
        ks = context_indices(11, k0, k1, context, spec.context_offset(1.5))
        stack = torch.from_numpy(canon[ks.reshape(-1)].astype(np.float32)).reshape(k1 - k0, context, 60, 52)
        want = resample_inplane(normalise_intensity(stack, bounds), (29, 25))
        assert got.shape == (k1 - k0, context, 29, 25) and torch.equal(got, want)
    np.testing.assert_array_equal(canon, before)  # the input volume is never written to


def test_out_of_memory_retries_the_chunk_smaller_with_the_same_result(tmp_path, monkeypatch):
    """A chunk that runs the GPU out of memory is redone with fewer slices from the same noise:
    the result is bit-identical to a run that fitted (simulated: torch raises the same error on CPU)."""
    from MedDiffSegLib.inference import engine

    volume, _ = sphere_volume((30, 14, 36))
    image = make_image(volume, direction=np.eye(3).reshape(-1))  # LPS: 30 axial slices
    pkg, method = profile_package(tmp_path, noise=0.1, band=(-0.4, 0.4))
    ref = segment_volume(image, pkg, ["liver", "spleen"], method=method, samples=3, chunk_slices=30)
    real = engine._chunk_input
    sizes = []

    def tight(canon, k0, k1, *a, **kw):
        sizes.append(k1 - k0)
        if k1 - k0 > 7:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(canon, k0, k1, *a, **kw)

    monkeypatch.setattr(engine, "_chunk_input", tight)
    seen = []
    res = segment_volume(image, pkg, ["liver", "spleen"], method=method, samples=3, chunk_slices=30,
                         progress=lambda stage, f, msg: seen.append(f))
    assert sizes[0] == 30 and max(sizes[1:]) <= 15 and res.chunk_slices < 30
    assert res.extras["out_of_memory_retries"] and res.extras["out_of_memory_retries"][0]["at_slice"] == 0
    np.testing.assert_array_equal(arr(res.labels), arr(ref.labels))
    np.testing.assert_array_equal(arr(res.uncertainty), arr(ref.uncertainty))
    assert res.extras["sampling"] == ref.extras["sampling"]
    assert seen == sorted(seen)  # progress never goes backwards

    def never(canon, k0, k1, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_chunk_input", never)
    with pytest.raises(DeviceError, match="out of memory on one batch of 3 windows"):
        segment_volume(image, pkg, ["liver"], method=method, samples=3)


def test_precision_choices(tmp_path):
    from MedDiffSegLib.inference.device import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None and resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(DeviceError, match="fp16.*needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="unknown precision 'half'"):
        resolve_precision("half", cpu)
    # a tiny real network under bf16 autocast: same shapes, probabilities close to float32's
    pkg = make_tiny_package(tmp_path / "pkg", "guided")
    image = make_image(sphere_volume((10, 14, 36))[0])
    a = segment_volume(image, pkg, ["liver"], samples=2, precision="fp32", keep_probabilities=True)
    b = segment_volume(image, pkg, ["liver"], samples=2, precision="bf16", keep_probabilities=True)
    assert a.extras["precision"] == "fp32" and b.extras["precision"] == "bf16"
    pa, pb = arr(a.probabilities["liver"]), arr(b.probabilities["liver"])
    assert pa.shape == pb.shape and float(np.abs(pa - pb).mean()) < 0.02
    with pytest.raises(DeviceError, match="fp16"):
        segment_volume(image, pkg, ["liver"], precision="fp16")
    # a package validated in bf16 gets it from "auto" on CPUs that compute bf16 natively, float32 elsewhere
    from MedDiffSegLib.inference.device import cpu_has_native_bf16

    assert resolve_precision("auto", cpu, "bf16") is (torch.bfloat16 if cpu_has_native_bf16() else None)
    pkg.inference["cpu_precision"] = "bf16"
    c = segment_volume(image, pkg, ["liver"], samples=1)
    assert c.extras["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert segment_volume(image, pkg, ["liver"], samples=1, precision="fp32").extras["precision"] == "fp32"
    pkg.inference["cpu_precision"] = "fp16"
    with pytest.raises(ModelError, match="cpu_precision must be 'fp32' or 'bf16'"):
        segment_volume(image, pkg, ["liver"], samples=1)
