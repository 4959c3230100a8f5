"""The ``dts`` method on the Method seam: k-NLS, reverse boundary attention, x0 sampling, training, its size, a
pretrained conditional encoder.

Tiny random models on 32×32 windows (CPU, milliseconds); one forward of the default config. The contract
every method keeps (sampling with every scheduler, seeds, conditions, argument checks, losses, configs)
is ``test_method_contract.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.methods.base import build_method
from MedDiffSegLib.methods.dts import (
    DTS,
    ENCODER_FILE,
    ENCODER_FORMAT,
    count_parameters,
    encoder_config,
    k_neighbour_label_smoothing,
    smooth_labels,
)
from MedDiffSegLib.networks.dts import ReverseBoundaryAttention
from tinymodels import tiny_method

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULERS = ["ddim", "euler_ancestral", "dpmsolver++", "unipc"]
B, H, W = 2, 32, 32


def _build(num_organs: int = 2, seed: int = 0, **overrides) -> DTS:
    return tiny_method("dts", num_organs, seed, **overrides).eval()


@pytest.fixture(scope="module")
def method():
    return _build()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _discs(n: int = 4, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    spec = [(10, 12, 6), (20, 18, 8), (16, 16, 10), (12, 22, 5)][:n]
    return torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float() for cy, cx, r in spec])[:, None]


# -- k-neighbour label smoothing ---------------------------------------------------------------


def test_knls_two_class_toy_map_matches_the_formula():
    label_map = np.zeros((12, 14), dtype=np.int64)
    label_map[1:5, 2:9] = 1  # a rectangle
    label_map[7:11, 6:10] = 2  # a square
    label_map[8, 12] = 2  # and an outlier pixel that moves the centroid of class 2
    onehot = torch.from_numpy(np.stack([label_map == 1, label_map == 2])[None].astype(np.float32))
    alpha, eps = 0.1, 1.0

    expected = np.zeros((2, 12, 14))
    for c in (1, 2):
        rows, cols = np.nonzero(label_map == c)
        cy, cx = rows.mean(), cols.mean()
        for i in range(12):
            for j in range(14):
                d = math.hypot(i - cy, j - cx)
                y = float(label_map[i, j] == c)
                expected[c - 1, i, j] = abs(y - alpha / (d + eps))

    got = smooth_labels(onehot, alpha=alpha, eps=eps)
    assert got.shape == onehot.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=0, atol=1e-6)
    # the same through the per-class function, and with other α, ε
    np.testing.assert_allclose(k_neighbour_label_smoothing(onehot, alpha, eps).numpy(), got.numpy(), rtol=0, atol=0)
    other = k_neighbour_label_smoothing(onehot, 0.3, 2.0)
    assert not torch.allclose(other, got)
    # soft labels stay in [0, 1]: foreground lowered, background raised, most near the centroid
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert float(got[0, 0][onehot[0, 0] == 1].max()) < 1 and float(got[0, 0][onehot[0, 0] == 0].min()) > 0


def test_knls_is_a_no_op_with_one_class():
    masks = _discs()
    assert smooth_labels(masks) is masks  # single structure: skipped, as in the paper
    # an absent class is left as it is
    empty = torch.zeros(1, 2, 16, 16)
    empty[0, 0, 4:8, 4:8] = 1
    out = smooth_labels(empty)
    assert torch.equal(out[0, 1], empty[0, 1]) and not torch.equal(out[0, 0], empty[0, 0])
    # the method: one organ → target = mask; several organs → each prompt's mask smoothed as its class map
    assert torch.equal(_build(num_organs=1).target(masks), masks)
    torch.testing.assert_close(_build(num_organs=2).target(masks), k_neighbour_label_smoothing(masks), rtol=0, atol=0)
    assert torch.equal(_build(num_organs=2, knls="off").target(masks), masks)
    assert not torch.equal(_build(num_organs=1, knls="on").target(masks), masks)


# -- reverse boundary attention ----------------------------------------------------------------


def test_rba_confident_foreground_suppresses_the_refined_features():
    torch.manual_seed(0)
    rba = ReverseBoundaryAttention(8, norm_groups=4)
    f1 = torch.randn(2, 8, 16, 16)
    f2 = torch.randn(2, 8, 16, 16) * 5
    foreground = torch.full((2, 1, 8, 8), 30.0)  # σ(30) ≈ 1: R = 1 − σ ≈ 0
    out1, att1 = rba(f1, foreground)
    out2, att2 = rba(f2, foreground)
    assert att1.shape == f1.shape and out1.shape == (2, 1, 16, 16)
    assert float(att1.abs().max()) < 1e-10 * float(f1.abs().max()) and float(att2.abs().max()) < 1e-10 * 5
    # with the features suppressed the refinement no longer depends on them
    torch.testing.assert_close(out1, out2, rtol=0, atol=1e-6)
    # a confident background map passes the features through; an uncertain one halves them
    _, att_bg = rba(f1, torch.full((2, 1, 8, 8), -30.0))
    torch.testing.assert_close(att_bg, f1, rtol=0, atol=1e-6)
    _, att_half = rba(f1, torch.zeros(2, 1, 8, 8))
    torch.testing.assert_close(att_half, f1 / 2, rtol=0, atol=1e-6)
    # and the features do matter where the coarse map is not confident
    out3, _ = rba(f1, torch.zeros(2, 1, 8, 8))
    out4, _ = rba(f2, torch.zeros(2, 1, 8, 8))
    assert not torch.allclose(out3, out4)


def test_rba_refines_stage_by_stage(method, images):
    """The denoiser returns one prediction per level, full resolution first, each twice the previous size."""
    cond = method.condition(images)
    t = torch.full((B,), 500)
    preds = method.denoiser(torch.randn(B, 1, H, W), t, cond[0], torch.tensor([0, 1]), list(cond[1:]))
    sizes = [p.shape[-1] for p in preds]
    assert sizes == [32, 16, 8, 4] and all(p.shape[:2] == (B, 1) for p in preds)


# -- inference ---------------------------------------------------------------------------------


def test_condition_is_the_windows_and_the_encoder_maps(method, images):
    """``(images, map_0, …, map_L)``; expanding it repeats every tensor (sampling it: test_method_contract.py)."""
    cond = method.condition(images)
    assert isinstance(cond, tuple) and torch.equal(cond[0], images) and len(cond) == 2 + len(method.config["depths"])
    expanded = method.expand_condition(cond, 2)
    direct_cond = method.condition(images.repeat_interleave(2, dim=0))
    for e, d in zip(expanded, direct_cond):
        torch.testing.assert_close(e, d, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="condition"):
        method.sample(cond[:-1], torch.tensor([0, 1]), 1, 1, None)


@pytest.mark.parametrize("scheduler", SCHEDULERS + ["ddpm"])
def test_x0_parameterisation_ends_on_the_predicted_mask(scheduler, images, monkeypatch):
    """A denoiser that always predicts the same mask: every scheduler, any step count, ends exactly on it."""
    m = _build()
    p = torch.rand(1, 1, H, W, generator=_gen(0)) * 0.8 + 0.1
    logits = torch.log(p / (1 - p))
    monkeypatch.setattr(m, "_logits", lambda x_t, t, image, organs, maps: logits.expand_as(x_t).clone())
    cond = m.condition(images)
    for steps in (1, 2, 4):
        probs = m.sample(cond, torch.tensor([0, 1]), 2, steps, _gen(1), scheduler)
        torch.testing.assert_close(probs, p.expand(B, 2, H, W), rtol=0, atol=1e-4)


# -- training ----------------------------------------------------------------------------------


def test_training_loss_terms_and_gradients(images):
    m = _build().train()
    assert m.stages == ("denoiser",)
    assert {id(p) for p in m.stage_parameters("denoiser")} == {id(p) for p in m.parameters()}
    masks = _discs(B)
    terms = m.training_loss(images, masks, torch.tensor([0, 1]), _gen(3))
    assert set(terms) == {"loss", "dice", "bce", "mse", "deep_supervision"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    c = m.config
    expected = (c["dice_weight"] * terms["dice"] + c["bce_weight"] * terms["bce"] + c["mse_weight"] * terms["mse"]
                + c["deep_supervision_weight"] * terms["deep_supervision"])
    torch.testing.assert_close(terms["loss"], expected)
    terms["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing[:5]  # τθ, the Swin encoder, decoder, every RBA stage and both embeddings learn


def test_overfits_a_few_discs():
    """The whole path can learn: one-step Dice > 0.8 on four disc masks within a CPU-second budget."""
    m = _build(num_organs=1, seed=1).train()
    masks = _discs()
    images = masks * 1.6 - 0.8  # the image shows the disc
    organs = torch.zeros(len(masks), dtype=torch.long)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = _gen(0)
    dice = 0.0
    for it in range(200):
        loss = m.training_loss(images, masks, organs, g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 20 == 19:
            m.eval()
            pred = (m(images, organs, 1, 1, _gen(it))[:, :1] >= 0.5).float()
            m.train()
            dice = float((2 * (pred * masks).sum() / (pred.sum() + masks.sum())))
            if dice > 0.8:
                break
    assert dice > 0.8


# -- configs and the default size --------------------------------------------------------------


def test_config_validation():
    tiny = DTS.tiny_config(3)
    with pytest.raises(ModelError, match="heads"):
        build_method("dts", {**tiny, "num_heads": [3, 2]})
    with pytest.raises(ModelError, match="as many Swin stages"):
        build_method("dts", {**tiny, "cond_depths": [1, 1, 1], "cond_num_heads": [1, 1, 1]})
    with pytest.raises(ModelError, match="knls"):
        build_method("dts", {**tiny, "knls": "sometimes"})
    with pytest.raises(ModelError, match="patch_size"):
        build_method("dts", {**tiny, "patch_size": 3})


def test_patch_size_four():
    """Patches of 4 (the default config's): conv levels at H/2 and H, windows in multiples of 16 here."""
    m = _build(patch_size=4)
    assert m.size_multiple == 16
    x = torch.rand(B, 1, H, W, generator=_gen(1)) * 2 - 1
    cond = m.condition(x)
    assert [c.shape[-1] for c in cond[1:]] == [8, 4, 2]
    probs = m.sample(cond, torch.tensor([0, 1]), 2, 2, _gen(0))
    assert probs.shape == (B, 2, H, W)
    preds = m.denoiser(torch.randn(B, 1, H, W), torch.full((B,), 10), x, torch.tensor([0, 1]), list(cond[1:]))
    assert [p.shape[-1] for p in preds] == [32, 16, 8, 4, 2]
    m.train()
    m.training_loss(x, _discs(B), torch.tensor([0, 1]), _gen(0))["loss"].backward()
    with pytest.raises(ValueError, match="divisible by 16"):
        m.condition(torch.zeros(1, 1, 40, 40))


def test_default_config_geometry_and_size():
    """The real config takes 128×128 (training) and 224×224 windows; parameter counts stay small."""
    counts = count_parameters(DTS.default_config(8))
    assert 1e6 < counts["total"] < 4e6 and counts["conditional_encoder"] < counts["denoiser"]
    assert count_parameters(DTS.tiny_config(2))["total"] < 1e5
    torch.manual_seed(0)
    m = build_method("dts", DTS.default_config(8)).eval()
    assert m.size_multiple == 32 and m.config["patch_size"] == 4
    assert m(torch.zeros(1, 1, 128, 128), torch.tensor([3]), 1, 1, _gen(0)).shape == (1, 1, 128, 128)


# -- a pretrained conditional encoder ----------------------------------------------------------


def _write_encoder(path, method: DTS, **meta_overrides):
    from safetensors.torch import save_file

    meta = {"format": ENCODER_FORMAT, "method": "dts", "name": "t", "steps": "7",
            "encoder_config": json.dumps(encoder_config(method.config)),
            "preprocessing": json.dumps({"modality": "CT"})}
    meta.update(meta_overrides)
    save_file({k: v.detach().contiguous() for k, v in method.cond_encoder.state_dict().items()}, str(path), metadata=meta)


def test_load_pretrained_encoder(tmp_path):
    source = _build(seed=5)
    (tmp_path / "run").mkdir()
    _write_encoder(tmp_path / "run" / ENCODER_FILE, source)
    target = _build(num_organs=3, seed=6)  # another organ count: τθ does not depend on it
    before = {k: v.clone() for k, v in target.denoiser.state_dict().items()}
    info = target.load_pretrained(tmp_path / "run")  # the folder, or the file itself
    assert info["steps"] == 7 and len(info["sha256"]) == 64 and info["path"].endswith(ENCODER_FILE)
    for k, v in source.cond_encoder.state_dict().items():
        assert torch.equal(target.cond_encoder.state_dict()[k], v)
    assert all(torch.equal(before[k], v) for k, v in target.denoiser.state_dict().items())  # only τθ is loaded
    target.load_pretrained(tmp_path / "run" / ENCODER_FILE)

    with pytest.raises(ModelError, match="cond_channels"):
        _build(cond_channels=4).load_pretrained(tmp_path / "run")
    _write_encoder(tmp_path / "other.safetensors", source, format="something-else")
    with pytest.raises(ModelError, match="not a pretrained dts"):
        target.load_pretrained(tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        target.load_pretrained(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read"):
        target.load_pretrained(tmp_path / "junk.safetensors")
