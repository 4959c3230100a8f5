"""Ensemble statistics, STAPLE fusion and connected-component post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.errors import InputError
from MedDiffSegLib.uncertainty import binary_entropy, ensemble_mean_variance, keep_largest_component, staple_fuse


def dilate(m, r):
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(m.astype(np.uint8)), [r] * m.ndim)).astype(bool)


def erode(m, r):
    return sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(m.astype(np.uint8)), [r] * m.ndim)).astype(bool)


# ---- mean / variance / entropy ---------------------------------------------------------
def test_mean_variance_matches_population_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, 8, 9, generator=g)
    mean, var = ensemble_mean_variance(x, dim=1)
    assert mean.shape == var.shape == (3, 8, 9) and mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(dim=1))
    torch.testing.assert_close(var, x.var(dim=1, unbiased=False))  # population variance, not N-1
    m_np, v_np = ensemble_mean_variance(x.numpy(), dim=1)
    assert m_np.dtype == v_np.dtype == np.float32
    np.testing.assert_allclose(m_np, mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(v_np, var.numpy(), atol=1e-6)


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1 / 3, 0.123456])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_variance_exactly_zero_when_samples_agree(value, n):
    x = torch.full((2, n, 4, 4), value, dtype=torch.float32)
    x[1] = 0.9  # second row: a different constant
    mean, var = ensemble_mean_variance(x, dim=1)
    assert torch.equal(var, torch.zeros_like(var))
    assert torch.equal(mean[0], x[0, 0]) and torch.equal(mean[1], x[1, 0])
    m_np, v_np = ensemble_mean_variance(x.numpy(), dim=1)
    assert not v_np.any() and np.array_equal(m_np, x[:, 0].numpy())


def test_variance_positive_where_samples_differ():
    x = torch.zeros(1, 4, 3, 3)
    x[0, 1, 1, 1] = 1.0  # one sample disagrees at one pixel
    _, var = ensemble_mean_variance(x, dim=1)
    assert var[0, 1, 1] == pytest.approx(3 / 16)
    var[0, 1, 1] = 0
    assert not var.any()


def test_binary_entropy():
    p = torch.tensor([0.0, 1e-8, 0.1, 0.5, 0.9, 1.0])
    h = binary_entropy(p)
    assert h.dtype == torch.float32
    assert h[0] == 0 and h[-1] == 0 and h[3] == pytest.approx(1.0)
    assert h[2] == pytest.approx(h[4]) == pytest.approx(0.4689955935892812, rel=1e-5)
    assert not torch.signbit(h).any()
    h_np = binary_entropy(p.numpy())
    assert h_np.dtype == np.float32
    np.testing.assert_allclose(h_np, h.numpy(), atol=1e-6)


# ---- STAPLE ------------------------------------------------------------------------------
def raters(seed: int):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((24, 48, 48))
    truth = ((z - 12) ** 2 + (y - 24) ** 2 + (x - 24) ** 2) <= 81
    shell = dilate(truth, 2) & ~erode(truth, 2)

    def good(p):  # errors only near the boundary
        return (truth ^ (shell & (rng.random(truth.shape) < p))).astype(np.uint8)

    bad = (truth ^ (dilate(truth, 4) & (rng.random(truth.shape) < 0.35))).astype(np.uint8)  # noisy everywhere
    return truth, np.stack([good(0.03), good(0.25), bad])


@pytest.mark.parametrize("seed", [0, 1])
def test_staple_beats_majority_vote_with_a_bad_rater(seed):
    truth, samples = raters(seed)
    res = staple_fuse(samples, return_details=True)
    prob = res.probability
    assert prob.dtype == np.float32 and prob.shape == truth.shape
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    majority = samples.mean(axis=0, dtype=np.float32) >= 0.5
    err_staple = int(((prob >= 0.5) != truth).sum())
    err_majority = int((majority != truth).sum())
    assert err_staple < 0.9 * err_majority, (err_staple, err_majority)
    # STAPLE found out who is bad ...
    assert np.argmin(res.sensitivity) == 2 and np.argmin(res.specificity) == 2
    assert res.iterations > 1
    # ... and is not a (reweighted) vote: voxels with the same vote count get different probabilities.
    votes = samples.sum(axis=0)
    one_vote = prob[votes == 1]
    assert one_vote.max() - one_vote.min() > 0.5
    # the reliable rater alone outweighs the two others
    alone = (samples[0] == 1) & (votes == 1)
    assert alone.any() and (prob[alone] >= 0.5).all()


def test_staple_needs_two_samples():
    with pytest.raises(InputError, match="at least 2"):
        staple_fuse(np.ones((1, 4, 4, 4), np.uint8))
    with pytest.raises(InputError):
        staple_fuse(np.ones((4,), np.uint8))


def test_staple_unanimous_samples():
    empty = np.zeros((3, 5, 6, 7), np.uint8)
    out = staple_fuse(empty)  # the EM is undefined here (the filter gives NaN); the answer is not
    assert out.dtype == np.float32 and not out.any()
    full = np.ones((2, 5, 6, 7), np.uint8)
    assert np.all(staple_fuse(full) == 1.0)
    same = np.zeros((3, 5, 6, 7), np.uint8)
    same[:, 1:3, 2:4, 2:5] = 1
    np.testing.assert_array_equal(staple_fuse(same), same[0].astype(np.float32))


def test_staple_accepts_bool_and_2d():
    truth, samples = raters(3)
    a = staple_fuse(samples[:, 12])
    b = staple_fuse(samples[:, 12].astype(bool))
    np.testing.assert_array_equal(a, b)
    assert a.shape == truth.shape[1:]


# ---- largest component -------------------------------------------------------------------
def test_keep_largest_component():
    m = np.zeros((10, 20, 20), np.uint8)
    m[2:8, 2:12, 2:12] = 1  # big
    m[3:5, 15:18, 15:18] = 1  # island
    m[8:10, 18:20, 0:2] = 1  # another island
    out = keep_largest_component(m)
    assert out.dtype == bool
    expect = np.zeros_like(m, bool)
    expect[2:8, 2:12, 2:12] = True
    np.testing.assert_array_equal(out, expect)
    assert not keep_largest_component(np.zeros((3, 4, 5))).any()


def test_keep_largest_component_connectivity():
    m = np.zeros((1, 6, 6), np.uint8)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = 1  # a diagonal: 3 components by faces, 1 fully connected
    m[0, 4:6, 4:6] = 1  # a 2x2 block (4 voxels)
    assert keep_largest_component(m).sum() == 4
    assert keep_largest_component(m, fully_connected=True).sum() == 4
    m[0, 3, 3] = 1  # now the diagonal joins the block when corners count
    assert keep_largest_component(m, fully_connected=True).sum() == 8
    assert keep_largest_component(m).sum() == 4


# ---- missed structure (continuation) ---------------------------------------------------------------
from MedDiffSegLib.uncertainty.continuation import coarse_mask, find_continuations  # noqa: E402
from MedDiffSegLib.uncertainty.ensemble import (dequantise_probability, dequantise_variance,  # noqa: E402
                                                quantise_probability, quantise_variance)


def _organ_grid(n_k=20, size=16):
    """Coarse [K, h, w] probabilities of an organ present (p = 1) on slices 5..12 in a 6x6-block square."""
    p = np.zeros((n_k, size, size), dtype=np.float32)
    p[5:13, 5:11, 5:11] = 1.0
    counts = (p >= 0.5).sum(axis=(1, 2)) * 16  # 16 voxels per block
    return p, counts


def _edge(p):
    return lambda k: p[k] >= 0.5


def test_continuation_follows_faint_probability_and_stops():
    p, counts = _organ_grid()
    p[13:16, 5:11, 5:11] = 0.3  # 36 blocks x 16 mm² x 0.3 = 172.8 mm² per slice
    p[17, 5:11, 5:11] = 0.3  # after a slice without probability: not part of the run
    runs = find_continuations(p, counts, _edge((p >= 0.5)), block_mm=(4.0, 4.0), slice_mm=2.0)
    assert [(r.kind, r.slices) for r in runs] == [("after", [13, 14, 15])]
    np.testing.assert_allclose(runs[0].area_mm2, [172.8] * 3, rtol=1e-5)


def test_continuation_ignores_faint_mass_far_from_the_organ_and_below_the_minimum():
    p, counts = _organ_grid()
    p[3:5, 12:16, 12:16] = 0.9  # far corner, next to the first slice: outside the dilated footprint
    p[13, 5:11, 5:11] = 0.09  # below min_probability
    assert find_continuations(p, counts, _edge(p >= 0.5), block_mm=(4.0, 4.0), slice_mm=2.0) == []
    # With a 40 mm dilation the corner is within reach.
    runs = find_continuations(p, counts, _edge(p >= 0.5), block_mm=(4.0, 4.0), slice_mm=2.0, dilate_mm=40.0)
    assert [(r.kind, r.slices) for r in runs] == [("before", [4, 3])]


def test_continuation_gap_max_extent_and_not_segmented():
    p, counts = _organ_grid(n_k=40)
    p[8] = 0.0
    p[8, 5:11, 5:11] = 0.4  # a slice missing inside the organ
    counts = (p >= 0.5).sum(axis=(1, 2)) * 16
    p[13:40, 5:11, 5:11] = 0.5 - 1e-3  # a long faint tail: capped at max_extent_mm
    runs = {r.kind: r for r in find_continuations(p, counts, _edge(p >= 0.5), block_mm=(4.0, 4.0), slice_mm=5.0)}
    assert runs["gap"].slices == [8]
    assert runs["after"].slices == list(range(13, 23))  # 50 mm / 5 mm
    empty = np.zeros_like(p)
    empty[20, 0:5, 0:5] = 0.45
    nothing = np.zeros(40, dtype=int)
    (run,) = find_continuations(empty, nothing, _edge(empty >= 0.5), block_mm=(4.0, 4.0), slice_mm=5.0)
    assert run.kind == "not_segmented" and run.slices == [20] and run.peak_slice == 20
    assert find_continuations(np.zeros_like(p), nothing, _edge(empty), block_mm=(4.0, 4.0), slice_mm=5.0) == []


def test_coarse_mask_marks_blocks_with_any_voxel():
    m = np.zeros((9, 10), dtype=bool)
    m[8, 9] = True
    cm = coarse_mask(m, (4, 4), (3, 3))
    assert cm.sum() == 1 and cm[2, 2]


def test_quantised_storage_round_trip():
    p = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(dequantise_probability(quantise_probability(p)), p, atol=0.5 / 255 + 1e-7)
    np.testing.assert_array_equal(quantise_probability(torch.from_numpy(p)), quantise_probability(p))
    v = np.linspace(0, 0.25, 1001, dtype=np.float32)
    back = dequantise_variance(quantise_variance(v))
    assert back[0] == 0.0 and back.dtype == np.float32
    np.testing.assert_allclose(np.sqrt(back), np.sqrt(v), atol=0.5 / 510 + 1e-6)
    np.testing.assert_array_equal(quantise_variance(torch.from_numpy(v)), quantise_variance(v))


# ---- temperature calibration -------------------------------------------------------------------------
from MedDiffSegLib.errors import ModelError  # noqa: E402
from MedDiffSegLib.uncertainty.calibration import apply_temperature, fit_temperature, temperatures  # noqa: E402


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 4.0, 200_000)
    p = 1.0 / (1.0 + np.exp(-z))  # the model's (over-confident) probability
    y = rng.random(z.size) < 1.0 / (1.0 + np.exp(-z / 2.5))  # the truth follows logits / 2.5
    fit = fit_temperature(p, y)
    assert fit["temperature"] == pytest.approx(2.5, rel=0.05)
    assert fit["nll_after"] < fit["nll_before"]
    calibrated = apply_temperature(p.astype(np.float32), fit["temperature"])
    assert abs(float(np.mean(calibrated)) - float(np.mean(y))) < 0.01


def test_apply_temperature_keeps_half_and_order_and_t1_is_identity():
    p = np.array([0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0], dtype=np.float32)
    assert apply_temperature(p, 1.0) is p
    q = apply_temperature(p, 2.0)
    assert q[3] == pytest.approx(0.5) and np.all(np.diff(q) > 0)
    assert q[1] > p[1] and q[5] < p[5]  # T > 1 softens
    np.testing.assert_allclose(apply_temperature(torch.from_numpy(p), 2.0).numpy(), q, atol=1e-6)
    t = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    x = torch.rand(1, 2, 3, 3)
    assert apply_temperature(x, t) is x


def test_temperatures_from_a_package_and_bad_values():
    inf = {"calibration": {"method": "temperature", "temperature": {"liver": 1.5}}}
    assert temperatures(inf, ["spleen", "liver"]) == [1.0, 1.5]
    assert temperatures({}, ["liver"]) == [1.0]
    with pytest.raises(ModelError, match="liver"):
        temperatures({"calibration": {"method": "temperature", "temperature": {"liver": -1}}}, ["liver"])
    with pytest.raises(ModelError, match="must be"):
        temperatures({"calibration": {"method": "platt"}}, ["liver"])


def test_staple_takes_samples_one_at_a_time():
    """A generator of samples (how the engine unpacks them) fuses exactly like the stacked array."""
    truth, samples = raters(4)
    stacked = staple_fuse(samples, return_details=True)
    streamed = staple_fuse((samples[i] for i in range(len(samples))), return_details=True)
    np.testing.assert_array_equal(streamed.probability, stacked.probability)
    assert streamed.sensitivity == stacked.sensitivity and streamed.iterations == stacked.iterations
    with pytest.raises(InputError, match="one shape"):
        staple_fuse(iter([samples[0], samples[1][:-1]]))
    with pytest.raises(InputError, match="at least 2"):
        staple_fuse(iter([samples[0]]))


def test_variance_written_to_disk_keeps_float32_and_its_precision():
    from MedDiffSegLib.uncertainty.ensemble import STORAGE_VARIANCE_FLOOR, variance_for_storage

    rng = np.random.default_rng(0)
    v = np.concatenate([rng.uniform(0, 0.25, 5000), 10.0 ** rng.uniform(-12, -6.5, 5000),  # organ edges; dust
                        [0.0, STORAGE_VARIANCE_FLOOR, np.nextafter(np.float32(STORAGE_VARIANCE_FLOOR), 0), 0.25]])
    v = v.astype(np.float32).reshape(2, -1)
    before = v.copy()
    out = variance_for_storage(v)
    np.testing.assert_array_equal(v, before)  # the engine's map is not touched
    assert out.dtype == np.float32 and out.shape == v.shape
    kept = v >= np.float32(STORAGE_VARIANCE_FLOOR)
    assert (out[~kept] == 0).all() and (out[kept] > 0).all()
    np.testing.assert_allclose(out[kept], v[kept], rtol=2.0**-11, atol=0)
    assert len(np.unique(out[kept].view(np.uint32) & np.uint32(0x1FFF))) == 1  # 13 low mantissa bits are zero
    # and it compresses: the dust is gone, the low bits are constant
    import zlib
    assert len(zlib.compress(out.tobytes(), 1)) < 0.6 * len(zlib.compress(v.tobytes(), 1))
