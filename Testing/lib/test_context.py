"""Axial context slices (2.5D input): indices, preprocessing spec, engine and training windows."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.inference import segment_volume
from MedDiffSegLib.methods.base import _METHODS, _import_builtin_methods, build_method
from MedDiffSegLib.preprocessing import PreprocessSpec
from MedDiffSegLib.preprocessing.spec import context_indices
from MedDiffSegLib.registry import save_package
from MedDiffSegLib.training.data import LabelledVolume, SliceWindowSampler

from tinymodels import TINY_ORGANS


def test_context_indices_clamp_at_the_ends_and_use_the_offset():
    idx = context_indices(5, 0, 5, 3, 1)
    assert idx.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert context_indices(10, 4, 6, 5, 2).tolist() == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert context_indices(3, 0, 3, 1, 1).tolist() == [[0], [1], [2]]


def test_context_offset_follows_the_slice_thickness():
    spec = PreprocessSpec(context_slices=3, context_spacing_mm=3.0)
    assert spec.context_offset(3.0) == 1
    assert spec.context_offset(5.0) == 1  # never 0: the neighbour is at least the next slice
    assert spec.context_offset(1.0) == 3
    assert spec.context_offset(0.625) == 5
    assert PreprocessSpec(context_slices=3).context_offset(1.0) == 1  # 0 mm: adjacent slices


@pytest.mark.parametrize("bad", [0, 2, -1, 1.5, True])
def test_context_slices_must_be_odd_and_positive(bad):
    with pytest.raises(ModelError, match="context_slices"):
        PreprocessSpec(context_slices=bad)


def test_spec_round_trips_the_context_keys():
    spec = PreprocessSpec(context_slices=3, context_spacing_mm=2.5)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict({"modality": "CT"}).context_slices == 1  # old packages: 2D


def _context_package(folder, channels: int, seed: int = 0):
    _import_builtin_methods()
    torch.manual_seed(seed)
    cfg = _METHODS["guided"].tiny_config(len(TINY_ORGANS))
    cfg["image_channels"] = channels
    m = build_method("guided", cfg)
    spec = PreprocessSpec(modality="CT", spacing=(6.0, 6.0), context_slices=channels)
    return save_package(folder, m, name=f"ctx{channels}", version="0.0.1", organs=TINY_ORGANS, preprocessing=spec,
                        inference={"roi_size": [32, 32], "overlap": 0.25, "steps": 1, "samples": 1,
                                   "sw_batch_size": 16}, provenance={"trained": False})


def _volume(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((6.0, 6.0, 3.0))
    img.SetOrigin((-20.0, 13.0, 7.0))
    return img


def _probability(pkg, arr, organ="liver"):
    res = segment_volume(_volume(arr), pkg, [organ], samples=1, steps=1, seed=0, keep_probabilities=True)
    return sitk.GetArrayFromImage(res.probabilities[organ]), res


def test_a_context_model_sees_the_neighbouring_slices_and_keeps_the_geometry(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.uniform(-200, 300, size=(6, 20, 24))
    ctx = _context_package(tmp_path / "c3", 3)
    flat = _context_package(tmp_path / "c1", 1)
    changed = arr.copy()
    changed[3] = -1000.0  # only slice 3 differs

    p_ctx, res = _probability(ctx, arr)
    q_ctx, _ = _probability(ctx, changed)
    assert res.labels.GetSize() == (24, 20, 6)
    assert res.labels.GetOrigin() == (-20.0, 13.0, 7.0) and res.labels.GetSpacing() == (6.0, 6.0, 3.0)
    # slices 2 and 4 have slice 3 as a neighbour: their output changes; slice 0 is two away: it does not
    assert not np.array_equal(p_ctx[2], q_ctx[2]) and not np.array_equal(p_ctx[4], q_ctx[4])
    np.testing.assert_array_equal(p_ctx[0], q_ctx[0])

    p_flat, _ = _probability(flat, arr)
    q_flat, _ = _probability(flat, changed)
    np.testing.assert_array_equal(p_flat[2], q_flat[2])  # a 2D model sees slice 2 alone


def test_context_chunks_give_the_same_result_as_one_chunk(tmp_path):
    arr = np.random.default_rng(1).uniform(-200, 300, size=(7, 20, 24))
    pkg = _context_package(tmp_path / "c3", 3)
    one = segment_volume(_volume(arr), pkg, ["liver", "spleen"], samples=2, steps=1, seed=3, keep_probabilities=True)
    many = segment_volume(_volume(arr), pkg, ["liver", "spleen"], samples=2, steps=1, seed=3, keep_probabilities=True,
                          chunk_slices=1)
    for organ in ("liver", "spleen"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(one.probabilities[organ]),
                                      sitk.GetArrayFromImage(many.probabilities[organ]))


def test_a_package_whose_network_and_spec_disagree_is_refused(tmp_path):
    pkg = _context_package(tmp_path / "c3", 3)
    flat_method = build_method("guided", {**pkg.config, "image_channels": 1})
    with pytest.raises(ModelError, match="context_slices is 3"):
        segment_volume(_volume(np.zeros((3, 20, 24))), pkg, ["liver"], method=flat_method)


def _labelled(n=5, h=40, w=40):
    images = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, h, w).clone() / 10  # slice k has value k/10
    labels = torch.zeros((n, h, w), dtype=torch.int16)
    labels[:, 10:30, 10:30] = 1  # organ 0 on every slice
    labels[2, 12:20, 12:20] = 2  # organ 1 only on slice 2
    present = np.stack([(labels == i + 1).flatten(1).any(1).numpy() for i in range(2)], 1)
    return LabelledVolume("v", images, labels, present, np.array([True, True]), context_offset=1)


def test_training_windows_carry_the_context_slices_in_order():
    vol = _labelled()
    sampler = SliceWindowSampler([vol], 2, 32, foreground_fraction=1.0, seed=0, context_slices=3)
    for _ in range(20):
        img, mask, organ = sampler.draw()
        assert img.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
        centre = img[1][mask[0] > 0]
        assert centre.numel() > 0
        k = round(float(centre[0]) * 10)
        expected = [max(0, k - 1) / 10, k / 10, min(4, k + 1) / 10]
        got = [float(img[c][mask[0] > 0][0]) for c in range(3)]
        assert got == pytest.approx(expected)


def test_organ_shift_moves_each_organ_alone_and_stays_in_range():
    vol = _labelled()
    base = SliceWindowSampler([vol], 2, 32, foreground_fraction=1.0, seed=5)
    shifted = SliceWindowSampler([vol], 2, 32, foreground_fraction=1.0, seed=5, organ_shift=(-0.5, -0.2),
                                 organ_shift_prob=1.0)
    seen_shift = False
    for _ in range(10):
        a, _, _ = base.draw()
        b, _, _ = shifted.draw()
        # the same window was drawn (the shift's draws come after the window's)
        lab = torch.zeros_like(a[0], dtype=torch.bool)
        diff = (a - b)[0]
        if diff.abs().max() > 0:
            seen_shift = True
            moved = diff != 0
            assert float(diff[moved].min()) >= 0.2 - 1e-6  # darker by 0.2-0.5, or clipped at -1
            assert float(b.min()) >= -1.0 and float(b.max()) <= 1.0
        base.rng.bit_generator.state = shifted.rng.bit_generator.state  # realign the streams
        del lab
    assert seen_shift


def test_mr_normalisation_ignores_the_scanner_scale(tmp_path, data_dir):
    """The same MR stored at another intensity scale gives the same probabilities (percentile normalisation)."""
    from MedDiffSegLib.io import read_volume

    path = data_dir / "chaos_mr" / "imagesTr" / "chaos_t2_05.nii.gz"
    if not path.is_file():
        pytest.skip(f"real MR not found at {path}")
    image = read_volume(path)
    arr = sitk.GetArrayFromImage(image)[10:14]
    _import_builtin_methods()
    torch.manual_seed(0)
    cfg = _METHODS["guided"].tiny_config(len(TINY_ORGANS))
    cfg["image_channels"] = 3
    spec = PreprocessSpec(modality="MR", spacing=(8.0, 8.0), context_slices=3)
    pkg = save_package(tmp_path / "mr", build_method("guided", cfg), name="tiny-mr", version="0.0.1",
                       organs=TINY_ORGANS, preprocessing=spec,
                       inference={"roi_size": [32, 32], "overlap": 0.25, "steps": 1, "samples": 1, "sw_batch_size": 16},
                       provenance={"trained": False})
    probs = []
    for scale in (1.0, 3.7):
        img = sitk.GetImageFromArray((arr * scale).astype(np.float32))
        img.CopyInformation(sitk.GetImageFromArray(arr))
        img.SetSpacing(image.GetSpacing())
        res = segment_volume(img, pkg, ["liver"], samples=1, steps=1, seed=0, keep_probabilities=True)
        probs.append(sitk.GetArrayFromImage(res.probabilities["liver"]))
        assert res.extras["intensity_bounds"][1] > res.extras["intensity_bounds"][0]
    # Equal up to float rounding, which can move a value across one step of the 8-bit storage (1/255).
    np.testing.assert_allclose(probs[0], probs[1], atol=1.0 / 255 + 1e-6)
