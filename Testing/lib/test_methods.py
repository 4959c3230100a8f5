"""What is particular to the latent-diffusion methods ``sdseg`` and ``guided`` (tiny random models, CPU).

The contract every method keeps (sampling, seeds, conditions, argument checks, losses, configs) is
``test_method_contract.py``.
"""

from __future__ import annotations

import pytest
import torch

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.methods.base import _METHODS, build_method
from MedDiffSegLib.methods.sdseg import SDSeg
from MedDiffSegLib.sampling import add_noise, alphas_cumprod, eps_to_x0
from tinymodels import tiny_method

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["sdseg", "guided"]
SCHEDULERS = ["ddim", "euler_ancestral", "dpmsolver++", "unipc"]
B, H, W = 2, 32, 32


def _build(name: str, num_organs: int = 2, seed: int = 0):
    return tiny_method(name, num_organs, seed).eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", METHODS)
def test_windows_must_fit_the_autoencoder_and_the_unet(name):
    m = _build(name)
    assert [k for k, _ in m._window_multiples()] == [8, 16] and m.size_multiple == 16
    with pytest.raises(ValueError, match=r"divisible by 8 for this model \(8× autoencoder\)"):
        m.condition(torch.zeros(1, 1, 36, 32))
    with pytest.raises(ValueError, match=r"divisible by 16 for this model \(8× autoencoder, 2× UNet\)"):
        m.condition(torch.zeros(1, 1, 40, 32))


# -- the two parameterisations ------------------------------------------------------------
def test_sdseg_loss_vanishes_for_the_true_noise():
    """The latent-estimation term uses Tweedie's formula too (exact for the true noise: test_method_contract.py)."""
    m = _build("sdseg")
    g = _gen(0)
    z0 = torch.rand(4, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(4, 4, 4, 4, generator=g)
    a = m._alpha_bar(torch.tensor([0, 250, 700, 999]), z0.device)
    z_t = add_noise(z0, eps, a)
    torch.testing.assert_close(eps_to_x0(z_t, eps, a), z0, rtol=0, atol=2e-4)
    terms = m.denoiser_loss(z0, z_t, eps, eps, a)
    assert float(terms["noise_mae"]) == 0.0 and float(terms["latent_mae"]) < 1e-4


def test_sdseg_loss_is_the_papers_mean_absolute_error_with_lambda_one():
    """SDSeg trains with |ε̂ − ε| + λ·|ẑ0 − z0|, λ = 1 (loss_type "l2" gives the squared variant)."""
    g = _gen(1)
    z0 = torch.rand(2, 4, 4, 4, generator=g) * 2 - 1
    eps, pred = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    a = torch.full((2, 1, 1, 1), 0.5)
    z_t = add_noise(z0, eps, a)
    m = _build("sdseg")
    assert m.config["loss_type"] == "l1" and m.config["latent_loss_weight"] == 1.0
    t = m.denoiser_loss(z0, z_t, eps, pred, a)
    z0_hat = eps_to_x0(z_t, pred, a)
    assert float(t["noise_mae"]) == pytest.approx(float((pred - eps).abs().mean()), rel=1e-6)
    assert float(t["latent_mae"]) == pytest.approx(float((z0_hat - z0).abs().mean()), rel=1e-6)
    assert float(t["loss"]) == pytest.approx(float(t["noise_mae"] + t["latent_mae"]), rel=1e-6)
    sq = build_method("sdseg", {**SDSeg.tiny_config(2), "loss_type": "l2"}).denoiser_loss(z0, z_t, eps, pred, a)
    assert float(sq["noise_mse"]) == pytest.approx(float(((pred - eps) ** 2).mean()), rel=1e-6)
    with pytest.raises(ModelError, match="loss_type must be 'l1' or 'l2'"):
        build_method("sdseg", {**SDSeg.tiny_config(2), "loss_type": "huber"})


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("scheduler", SCHEDULERS + ["ddpm"])
def test_method_loop_converts_to_the_predicted_z0_exactly(name, scheduler, images, monkeypatch):
    """Replace the denoiser by one that 'knows' z0: every scheduler must end on exactly that z0."""
    m = _build(name)
    target = torch.rand(1, 4, 4, 4, generator=_gen(0)) * 1.6 - 0.8
    ac = alphas_cumprod().double()

    def fake_denoiser(z_t, t, cond, organs):
        if m.prediction_type == "sample":
            return target.expand_as(z_t).clone()
        # ε implied by target at the loop's ᾱ_t (guided: x0 directly; sdseg: noise)
        a = ac[t.round().long()].float().view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * target) / (1 - a).sqrt()

    monkeypatch.setattr(m, "denoiser", _Wrap(fake_denoiser, m.denoiser.size_multiple))
    expected = torch.sigmoid(m.mask_autoencoder.decode(target)).view(1, 1, H, W)
    cond = m.condition(images)
    for steps in (1, 4):
        probs = m.sample(cond, torch.tensor([0, 1]), 2, steps, _gen(1), scheduler)
        torch.testing.assert_close(probs, expected.expand_as(probs), rtol=0, atol=1e-3)


class _Wrap(torch.nn.Module):
    def __init__(self, fn, size_multiple):
        super().__init__()
        self.fn, self.size_multiple = fn, size_multiple

    def forward(self, *args):
        return self.fn(*args)


# -- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_training_stages_and_gradients(name, images):
    m = _build(name).train()
    assert m.stages == ("autoencoder", "denoiser")
    masks = (torch.rand(B, 1, H, W, generator=_gen(2)) > 0.5).float()
    organs = torch.tensor([0, 1])
    all_ids = {id(p) for p in m.parameters()}
    stage_ids = {s: {id(p) for p in m.stage_parameters(s)} for s in m.stages}
    assert stage_ids["autoencoder"].isdisjoint(stage_ids["denoiser"])
    assert stage_ids["autoencoder"] | stage_ids["denoiser"] == all_ids
    assert stage_ids["autoencoder"] == {id(p) for p in m.mask_autoencoder.parameters()}

    for stage in m.stages:
        m.zero_grad(set_to_none=True)
        terms = m.training_loss(images, masks, organs, _gen(3), stage)
        assert "loss" in terms and len(terms) >= 2
        assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
        terms["loss"].backward()
        trained = [p for p in m.parameters() if id(p) in stage_ids[stage]]
        frozen = [p for p in m.parameters() if id(p) not in stage_ids[stage]]
        assert all(p.grad is not None for p in trained), stage
        assert sum(float(p.grad.abs().sum()) for p in trained) > 0, stage
        assert all(p.grad is None for p in frozen), stage
    expected_terms = {"sdseg": {"loss", "noise_mae", "latent_mae"}, "guided": {"loss", "x0_mse"}}[name]
    assert set(m.training_loss(images, masks, organs, _gen(3)).keys()) == expected_terms  # default = last stage


def _discs(n: int = 6, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    spec = [(10, 12, 6), (20, 18, 8), (16, 16, 10), (12, 22, 5), (22, 10, 7), (16, 8, 4)][:n]
    return torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float() for cy, cx, r in spec])[:, None]


def test_mask_autoencoder_overfits_discs():
    """The AE path can learn: Dice > 0.9 on a few disc masks within a few seconds of CPU."""
    m = _build("guided", seed=0).train()
    masks = _discs()
    images = torch.zeros_like(masks)
    organs = torch.zeros(len(masks), dtype=torch.long)
    opt = torch.optim.Adam(m.stage_parameters("autoencoder"), lr=1e-2)
    dice = 0.0
    for it in range(300):
        loss = m.training_loss(images, masks, organs, stage="autoencoder")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 25 == 24:
            with torch.no_grad():
                pred = (m.mask_autoencoder(masks) > 0).float()
                dice = float((2 * (pred * masks).sum((1, 2, 3)) / (pred.sum((1, 2, 3)) + masks.sum((1, 2, 3)))).min())
            if dice > 0.9:
                break
    assert dice > 0.9
    with torch.no_grad():
        z = m.mask_autoencoder.encode(masks)
    assert z.shape == (len(masks), 4, 4, 4) and float(z.abs().max()) <= 1.0


# -- configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_default_config_geometry(name):
    """The real config: latents of 28 → 14 → 7 on 224×224 windows, attention at the coarsest level only."""
    cfg = _METHODS[name].default_config(4)
    assert cfg["unet_attention_levels"] == [False, False, True]
    assert 28 % (2 ** (len(cfg["unet_channels"]) - 1)) == 0
    torch.manual_seed(0)
    assert build_method(name, cfg).size_multiple == 32  # 200×200 windows (25-pixel latents) are refused
