"""``meddelinea``: Control DiT beside a DiT in latent space (tiny random models, CPU).

The contract every method keeps (sampling with every scheduler, seeds, conditions, argument checks,
losses, configs) is ``test_method_contract.py``; this file tests what is particular to MedDelinea.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.methods.base import _METHODS, build_method
from MedDiffSegLib.methods.meddelinea import PAPER_SHAPE, MedDelinea
from MedDiffSegLib.networks.dit import ControlledDiT, DiT
from MedDiffSegLib.sampling import SCHEDULERS, alphas_cumprod
from tinymodels import make_tiny_package, tiny_method, wake_control

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "meddelinea"
ALL_SCHEDULERS = ["euler_ancestral", "ddim", "dpmsolver++", "unipc", "lms", "ddpm"]
B, H, W = 2, 32, 32


def _build(num_organs: int = 2, seed: int = 0, **overrides) -> MedDelinea:
    return tiny_method(NAME, num_organs, seed, **overrides).eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def method():
    return _build()


def _control_zero_layers(m: MedDelinea) -> list[torch.nn.Module]:
    return [m.denoiser.control.cond_zero_conv, *m.denoiser.control.zero_proj]


def _train_mode_for(m: MedDelinea, stage: str) -> None:
    """What the trainer does before a stage: only the stage's parameters require gradients."""
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m.stage_parameters(stage):
        p.requires_grad_(True)
    m.train()


# -- the method on the seam --------------------------------------------------------------------
def test_registered_with_paper_defaults():
    cls = _METHODS[NAME]
    assert cls is MedDelinea
    assert cls.default_scheduler == "euler_ancestral" and cls.default_scheduler in SCHEDULERS
    assert "lms" in SCHEDULERS
    assert cls.stages == ("autoencoder", "denoiser")
    cfg = cls.default_config(8)
    assert cfg["freeze_dit"] is False and cfg["freeze_image_encoder"] is True and cfg["adaln_zero"] is True
    assert 1 <= cfg["control_depth"] <= cfg["dit_depth"]


def test_malformed_conditions_are_refused(method, images):
    cond = method.condition(images)
    with pytest.raises(ValueError, match=r"cond must have shape \[B,4,h,w\]"):
        method.sample(cond[:, :2], torch.tensor([0, 1]), 1, 1, None)
    with pytest.raises(ValueError, match="not divisible by 2 \\(patches of 2\\)"):
        method.sample(torch.zeros(2, 4, 4, 5), torch.tensor([0, 1]), 1, 1, None)
    with pytest.raises(ValueError, match="takes no interactive prompts"):
        method.sample(cond, torch.tensor([0, 1]), 1, 1, None, prompts=torch.zeros(2, 4, H, W))


# -- zero-initialised control path ----------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"patch_size": 1, "control_depth": 3}, {"adaln_zero": True}])
def test_control_path_changes_nothing_at_initialisation(overrides, images):
    m = _build(seed=4, **overrides)
    for layer in _control_zero_layers(m):
        assert all(not bool(p.any()) for p in layer.parameters())
    g = _gen(0)
    z = torch.randn(3, 4, 4, 4, generator=g)
    cond = torch.rand(3, 4, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([999.0, 417.5, 3.0])
    organs = torch.tensor([1, 0, 1])
    with torch.no_grad():
        controlled = m.denoiser(z, t, cond, organs)
        plain = m.denoiser.dit(z, t, organs)
        assert torch.equal(controlled, plain)  # exactly, not approximately
        assert torch.equal(controlled, m.denoiser(z, t, cond, organs, use_control=False))
        # the residuals the Control DiT hands over are exact zeros, one per matching DiT block
        residuals = m.denoiser.control(z, cond, t, organs)
        assert len(residuals) == m.config["control_depth"]
        assert all(not bool(r.any()) for r in residuals)
    # through the whole method: the image cannot change anything yet
    other = torch.flip(images, dims=[0, 2])
    for steps in (1, 3):
        a = m(images, torch.tensor([0, 1]), 2, steps, _gen(1))
        b = m(other, torch.tensor([0, 1]), 2, steps, _gen(1))
        assert torch.equal(a, b)


def test_woken_control_path_is_live(images):
    """Once the zero layers have weights, the control residuals reach the DiT and the image matters."""
    m = _build(seed=4)
    wake_control(m)
    g = _gen(0)
    z = torch.randn(2, 4, 4, 4, generator=g)
    cond = m.condition(images)
    t = torch.tensor([500, 20])
    organs = torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.equal(m.denoiser(z, t, cond, organs), m.denoiser.dit(z, t, organs))
    a = m(images, organs, 1, 1, _gen(1))
    b = m(torch.flip(images, dims=[0, 2]), organs, 1, 1, _gen(1))
    assert not torch.equal(a, b)


def test_dit_rejects_more_control_residuals_than_blocks():
    dit = DiT(4, 4, 2, width=16, depth=2, heads=2, patch_size=2, adaln_zero=False)
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="control residuals"):
        dit(x, torch.tensor([1]), torch.tensor([0]), [torch.zeros(1, 4, 16)] * 3)
    with pytest.raises(ValueError, match="control_depth"):
        ControlledDiT(4, 4, 2, width=16, depth=2, control_depth=3, heads=2)


# -- gradients ---------------------------------------------------------------------------------------
def _grad_sum(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def test_gradients_reach_the_control_dit_not_a_frozen_dit(images, masks):
    m = _build(seed=1, freeze_dit=True)
    _train_mode_for(m, "denoiser")
    organs = torch.tensor([0, 1])
    control = list(m.denoiser.control.parameters())
    dit = list(m.denoiser.dit.parameters())
    head = list(m.mask_autoencoder.decoder.head.parameters())
    head_name = "mask_autoencoder.decoder.head."
    frozen_ae = [p for n, p in m.named_parameters()
                 if n.startswith(("image_autoencoder.", "mask_autoencoder.")) and not n.startswith(head_name)]
    ids = {id(p) for p in m.stage_parameters("denoiser")}
    assert ids == {id(p) for p in control + head}

    # at initialisation only the zero projections receive signal (their inputs are the control features) ...
    terms = m.training_loss(images, masks, organs, _gen(3))
    terms["loss"].backward()
    assert all(p.grad is None for p in dit + frozen_ae)
    assert _grad_sum(m.denoiser.control.zero_proj.parameters()) > 0
    assert _grad_sum(head) > 0

    # ... and after a few optimiser steps every parameter of the Control DiT gets a gradient; the DiT none.
    opt = torch.optim.Adam(m.stage_parameters("denoiser"), lr=1e-2)
    dit_before = [p.detach().clone() for p in dit]
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        m.training_loss(images, masks, organs, _gen(3))["loss"].backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    m.training_loss(images, masks, organs, _gen(4))["loss"].backward()
    for name, p in m.denoiser.control.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in dit + frozen_ae)
    assert all(torch.equal(a, p) for a, p in zip(dit_before, dit))


def test_unfrozen_dit_is_trained(images, masks):
    m = _build(seed=1)
    assert m.config["freeze_dit"] is False
    _train_mode_for(m, "denoiser")
    m.training_loss(images, masks, torch.tensor([0, 1]), _gen(3))["loss"].backward()
    for name, p in m.denoiser.dit.named_parameters():
        if name.startswith("embed.label"):  # only the rows of the organs in the batch
            assert float(p.grad.abs().sum()) > 0
            continue
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert {id(p) for p in m.stage_parameters("denoiser")} >= {id(p) for p in m.denoiser.dit.parameters()}


def test_stage_parameters():
    m = _build()
    ae = {id(p) for p in m.stage_parameters("autoencoder")}
    assert ae == {id(p) for p in [*m.mask_autoencoder.parameters(), *m.image_autoencoder.parameters()]}
    den = {id(p) for p in m.stage_parameters("denoiser")}
    head = {id(p) for p in m.mask_autoencoder.decoder.head.parameters()}
    assert ae & den == head  # the decoder's last layer keeps training in the denoiser stage
    assert den == {id(p) for p in m.denoiser.parameters()} | head
    trainable_encoder = _build(freeze_image_encoder=False)
    den2 = {id(p) for p in trainable_encoder.stage_parameters("denoiser")}
    assert {id(p) for p in trainable_encoder.image_autoencoder.encoder.parameters()} <= den2
    with pytest.raises(ValueError, match="stage"):
        m.stage_parameters("pretrain")


def test_trainable_image_encoder_gets_gradients(images, masks):
    m = _build(seed=1, freeze_image_encoder=False)
    wake_control(m)
    _train_mode_for(m, "denoiser")
    m.training_loss(images, masks, torch.tensor([0, 1]), _gen(3))["loss"].backward()
    assert _grad_sum(m.image_autoencoder.encoder.parameters()) > 0
    assert all(p.grad is None for p in m.image_autoencoder.decoder.parameters())


def test_autoencoder_stage(images, masks):
    m = _build(seed=2)
    _train_mode_for(m, "autoencoder")
    terms = m.training_loss(images, masks, torch.tensor([0, 1]), _gen(3), stage="autoencoder")
    assert set(terms) == {"loss", "mask_bce", "mask_dice", "image_l1"}
    terms["loss"].backward()
    assert _grad_sum(m.image_autoencoder.parameters()) > 0 and _grad_sum(m.mask_autoencoder.parameters()) > 0
    assert all(p.grad is None for p in m.denoiser.parameters())
    assert set(m.training_loss(images, masks, torch.tensor([0, 1]), _gen(3))) == {"loss", "noise_mse", "bce", "dice"}


def test_denoiser_stage_learns():
    """A few dozen steps on a fixed batch lower the loss (noise MSE + BCE + Dice)."""
    m = _build(seed=5)
    g = _gen(11)
    masks = (torch.rand(4, 1, H, W, generator=g) > 0.6).float()
    images = masks * 1.5 - 0.75 + 0.1 * torch.randn(4, 1, H, W, generator=g)
    organs = torch.tensor([0, 1, 0, 1])
    _train_mode_for(m, "denoiser")
    opt = torch.optim.AdamW(m.stage_parameters("denoiser"), lr=3e-3)
    losses = []
    for it in range(60):
        loss = m.training_loss(images, masks, organs, _gen(1000 + it % 4))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


# -- Tweedie -----------------------------------------------------------------------------------------
class _Fake(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_training_loss_decodes_the_true_z0_when_the_noise_prediction_is_exact(images, masks, monkeypatch):
    """With ε̂ = ε the loss's Tweedie estimate is z0: noise MSE 0 and BCE/Dice of decode(encode(mask))."""
    m = _build(seed=3)
    with torch.no_grad():
        z0 = m.mask_autoencoder.encode(masks)
    ac = alphas_cumprod().double()
    seen = []

    def exact_noise(z_t, t, cond, organs):
        seen.append(t.clone())
        a = ac[t.long()].float().view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * z0) / (1 - a).sqrt()

    monkeypatch.setattr(m, "denoiser", _Fake(exact_noise))
    with torch.no_grad():
        terms = m.training_loss(images, masks, torch.tensor([0, 1]), _gen(8))
        logits = m.mask_autoencoder.decode(z0)
    assert float(terms["noise_mse"]) < 1e-8
    torch.testing.assert_close(terms["bce"], F.binary_cross_entropy_with_logits(logits, masks), rtol=0, atol=2e-4)
    assert len(seen) == 1 and seen[0].dtype == torch.long


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_sampling_ends_on_the_z0_an_exact_noise_prediction_implies(scheduler, images, monkeypatch):
    m = _build()
    target = torch.rand(1, 4, 4, 4, generator=_gen(0)) * 1.6 - 0.8
    ac = alphas_cumprod().double()

    def exact_noise(z_t, t, cond, organs):
        a = ac[t.float().round().long()].float().view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * target) / (1 - a).sqrt()

    monkeypatch.setattr(m, "denoiser", _Fake(exact_noise))
    expected = torch.sigmoid(m.mask_autoencoder.decode(target)).view(1, 1, H, W)
    cond = m.condition(images)
    for steps in (1, 4):
        probs = m.sample(cond, torch.tensor([0, 1]), 2, steps, _gen(1), scheduler)
        torch.testing.assert_close(probs, expected.expand_as(probs), rtol=0, atol=1e-3)


# -- configs -------------------------------------------------------------------------------------------
def test_config_validation():
    cls = _METHODS[NAME]
    with pytest.raises(ModelError, match="control_depth"):
        build_method(NAME, {**cls.tiny_config(1), "control_depth": 4})
    with pytest.raises(ModelError, match="heads"):
        build_method(NAME, {**cls.tiny_config(1), "dit_heads": 3})
    with pytest.raises(ModelError, match="freeze_dit"):
        build_method(NAME, {**cls.tiny_config(1), "freeze_dit": "yes"})
    with pytest.raises(ModelError, match="integer"):
        build_method(NAME, {**cls.tiny_config(1), "dit_depth": 2.5})
    assert build_method(NAME, {**cls.tiny_config(1), "freeze_dit": 1}).config["freeze_dit"] is True


def test_default_config_geometry():
    """The real config: 224×224 windows give latents of 28 → 14×14 tokens; 200×200 (25-pixel latents) cannot be patched."""
    torch.manual_seed(0)
    m = build_method(NAME, _METHODS[NAME].default_config(4))
    assert m.size_multiple == 16 and [k for k, _ in m._window_multiples()] == [8, 16]


def test_paper_k15_shape_is_reachable_by_config():
    """The ablation shape (K=15 control blocks beside a DiT-XL/2-sized DiT), built without memory."""
    cfg = {**_METHODS[NAME].default_config(8), **PAPER_SHAPE}
    with torch.device("meta"):
        m = build_method(NAME, cfg)
    assert m.denoiser.control.depth == 15 and m.denoiser.dit.depth == 28
    dit = sum(p.numel() for p in m.denoiser.dit.parameters())
    control = sum(p.numel() for p in m.denoiser.control.parameters())
    assert 6.5e8 < dit < 7.0e8  # DiT-XL/2 has about 675 M parameters
    assert 3.5e8 < control < 4.0e8


# -- starting from a trained model (the paper's frozen pretrained DiT) ------------------------------
def test_load_pretrained_takes_autoencoders_and_dit_not_the_control(tmp_path):
    pkg = make_tiny_package(tmp_path / "donor", method=NAME, seed=21)
    donor = pkg.load_method()
    m = _build(seed=22, freeze_dit=True)
    wake_control(m)
    control_before = {k: v.clone() for k, v in m.denoiser.control.state_dict().items()}
    info = m.load_pretrained(pkg.path)
    assert info["sha256"] == pkg.weights_sha256 and info["tensors"] > 0
    json.dumps(info)  # goes into the provenance
    mine, theirs = m.state_dict(), donor.state_dict()
    for k in mine:
        if k.startswith(("image_autoencoder.", "mask_autoencoder.", "denoiser.dit.")):
            assert torch.equal(mine[k], theirs[k]), k
    assert all(torch.equal(v, m.denoiser.control.state_dict()[k]) for k, v in control_before.items())
    # the weights file alone works too; other methods and other shapes are refused
    assert m.load_pretrained(pkg.weights_path)["tensors"] == info["tensors"]
    with pytest.raises(ModelError, match="not 'meddelinea'"):
        m.load_pretrained(make_tiny_package(tmp_path / "guided", method="guided").path)
    with pytest.raises(ModelError, match="do not fit"):
        _build(dit_width=16).load_pretrained(pkg.path)
    with pytest.raises(ModelError, match="do not exist"):
        m.load_pretrained(tmp_path / "nothing.safetensors")
