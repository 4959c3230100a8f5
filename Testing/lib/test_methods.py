"""The latent-diffusion methods ``sdseg`` and ``guided`` on the Method seam (tiny random models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.methods.base import _METHODS, available_methods, build_method
from MedDiffSegLib.sampling import add_noise, alphas_cumprod, eps_to_x0

METHODS = ["sdseg", "guided"]
SCHEDULERS = ["ddim", "euler_ancestral", "dpmsolver++", "unipc"]
B, H, W = 2, 32, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors run faster on one thread, and do not spin against other processes on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(name: str, num_organs: int = 2, seed: int = 0):
    assert name in available_methods()
    torch.manual_seed(seed)
    return build_method(name, _METHODS[name].tiny_config(num_organs)).eval()


@pytest.fixture(scope="module", params=METHODS)
def method(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def images():
    return torch.rand(B, 1, H, W, generator=torch.Generator().manual_seed(123)) * 2 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- inference ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4])
def test_sample_shape_range_and_seeds(method, images, scheduler, steps):
    cond = method.condition(images)
    organs = torch.tensor([1, 0])
    a = method.sample(cond, organs, 3, steps, _gen(5), scheduler)
    assert a.shape == (B, 3, H, W) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    b = method.sample(cond, organs, 3, steps, _gen(5), scheduler)  # second call: no scheduler state leaks
    c = method.sample(cond, organs, 3, steps, _gen(6), scheduler)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the N chains of one row are different samples
    assert not torch.equal(a[:, 0], a[:, 1])
    # forward() is condition() + sample()
    assert torch.equal(method(images, organs, 3, steps, _gen(5), scheduler), a)


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc"])
def test_repeated_calls_with_history_schedulers(method, images, scheduler):
    """Multistep schedulers keep history between steps; a fresh one per call keeps calls independent."""
    cond = method.condition(images)
    organs = torch.tensor([0, 1])
    first = method.sample(cond, organs, 2, 5, _gen(1), scheduler)
    method.sample(cond, organs, 4, 3, _gen(2), scheduler)  # a different run in between
    again = method.sample(cond, organs, 2, 5, _gen(1), scheduler)
    assert torch.equal(first, again)


def test_condition_reuse_is_exact(method, images):
    """condition once + expand_condition for 2 organs == forward on each (window, organ) row."""
    cond = method.condition(images)
    expanded = method.expand_condition(cond, 2)
    organs = torch.tensor([0, 1] * B)  # row order: window-major, organ-minor (repeat_interleave)
    torch.testing.assert_close(expanded, method.condition(images.repeat_interleave(2, dim=0)), rtol=0, atol=1e-6)
    for steps in (1, 3):
        reused = method.sample(expanded, organs, 2, steps, _gen(9), None)
        direct = method(images.repeat_interleave(2, dim=0), organs, 2, steps, _gen(9))
        torch.testing.assert_close(reused, direct, rtol=0, atol=1e-5)
    # per organ: the organ-k rows of the reused batch equal forward() for organ k alone when the
    # same noise is used (steps=1 with a fixed generator state drawn per organ)
    per_organ = [method.sample(cond, torch.full((B,), k), 1, 1, _gen(4), None) for k in (0, 1)]
    single = [method(images, torch.full((B,), k), 1, 1, _gen(4)) for k in (0, 1)]
    for a, b in zip(per_organ, single):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert method.expand_condition(cond, 1) is cond


@pytest.mark.parametrize("name", ["sdseg", "guided", "meddelinea", "medsegdiff_v2", "dts"])
def test_select_condition_samples_the_chosen_windows_as_if_encoded_alone(name):
    """The engine samples only the windows that still need samples, from the batch's condition."""
    m = _build(name)
    imgs = torch.rand(3, m.image_channels, H, W, generator=_gen(5)) * 2 - 1
    cond = m.condition(imgs)
    for rows in ([2], [0, 2], [1, 0]):
        r = torch.tensor(rows)
        organs = torch.tensor([1] * len(rows))
        picked = m.sample(m.select_condition(cond, r), organs, 2, 1, _gen(8), None)
        alone = m.sample(m.condition(imgs[r]), organs, 2, 1, _gen(8), None)
        torch.testing.assert_close(picked, alone, rtol=0, atol=1e-4)  # batch-size effects in the kernels only
    with pytest.raises((IndexError, RuntimeError)):
        m.select_condition(cond, torch.tensor([3]))


def test_organ_prompt_changes_the_output(method, images):
    cond = method.condition(images)
    a = method.sample(cond, torch.tensor([0, 0]), 1, 1, _gen(3))
    b = method.sample(cond, torch.tensor([1, 1]), 1, 1, _gen(3))
    assert not torch.equal(a, b)


def test_input_validation(method, images):
    with pytest.raises(ValueError, match="divisible by 8"):
        method.condition(torch.zeros(1, 1, 36, 32))
    with pytest.raises(ValueError, match="divisible by 16"):  # tiny UNet halves the 8× latent once more
        method.condition(torch.zeros(1, 1, 40, 32))
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        method.condition(torch.zeros(1, 2, 32, 32))
    cond = method.condition(images)
    with pytest.raises(ValueError, match="organ"):
        method.sample(cond, torch.tensor([0, 2]), 1, 1, None)
    with pytest.raises(ValueError, match="organ_ids"):
        method.sample(cond, torch.tensor([0]), 1, 1, None)
    with pytest.raises(ValueError, match="valid schedulers"):
        method.sample(cond, torch.tensor([0, 1]), 1, 2, None, "heun")
    with pytest.raises(ValueError):
        method.sample(cond, torch.tensor([0, 1]), 0, 1, None)
    with pytest.raises(ValueError):
        method.training_loss(images, torch.zeros(B, 1, 24, 24), torch.tensor([0, 1]), stage="autoencoder")
    with pytest.raises(ValueError, match="stage"):
        method.training_loss(images, torch.zeros(B, 1, H, W), torch.tensor([0, 1]), stage="nope")


# -- the two parameterisations ------------------------------------------------------------
def test_sdseg_latent_estimation_is_exact_for_true_noise():
    m = _build("sdseg")
    g = _gen(0)
    z0 = torch.rand(4, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(4, 4, 4, 4, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    a = m._alpha_bar(t, z0.device)
    z_t = add_noise(z0, eps, a)
    torch.testing.assert_close(m.predicted_x0(z_t, eps, a), z0, rtol=0, atol=2e-4)
    torch.testing.assert_close(eps_to_x0(z_t, eps, a), z0, rtol=0, atol=2e-4)
    # the loss uses the same formula: with ε̂ = ε both terms vanish
    terms = m.denoiser_loss(z0, z_t, eps, eps, a)
    assert float(terms["noise_mse"]) == 0.0 and float(terms["latent_mse"]) < 1e-7
    # ᾱ comes from the diffusers schedule the samplers use
    torch.testing.assert_close(m._alpha_bar(torch.arange(1000), z0.device), alphas_cumprod(), rtol=0, atol=1e-7)


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
    expected_terms = {"sdseg": {"loss", "noise_mse", "latent_mse"}, "guided": {"loss", "x0_mse"}}[name]
    assert set(m.training_loss(images, masks, organs, _gen(3)).keys()) == expected_terms  # default = last stage


@pytest.mark.parametrize("name", METHODS)
def test_training_loss_follows_the_generator(name, images):
    m = _build(name)
    masks = (torch.rand(B, 1, H, W, generator=_gen(2)) > 0.5).float()
    organs = torch.tensor([0, 1])
    with torch.no_grad():
        a = m.training_loss(images, masks, organs, _gen(3))["loss"]
        b = m.training_loss(images, masks, organs, _gen(3))["loss"]
        c = m.training_loss(images, masks, organs, _gen(4))["loss"]
    assert float(a) == float(b) and float(a) != float(c)


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


# -- configs and persistence --------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip_and_safetensors(name, images, tmp_path):
    from safetensors.torch import load_file, save_file

    m = _build(name, seed=11)
    cfg = json.loads(json.dumps(m.config))  # as stored in model.json
    assert cfg == m.config
    path = tmp_path / "w.safetensors"
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
    torch.manual_seed(999)  # different init: the weights must come from the file
    m2 = build_method(name, cfg).eval()
    assert m2.config == m.config
    m2.load_state_dict(load_file(str(path)), strict=True)
    organs = torch.tensor([1, 0])
    for steps, sched in ((1, None), (3, "unipc")):
        torch.testing.assert_close(m(images, organs, 2, steps, _gen(0), sched), m2(images, organs, 2, steps, _gen(0), sched),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_config_validation_and_defaults(name):
    cls = _METHODS[name]
    with pytest.raises(ModelError, match="unknown keys"):
        build_method(name, {**cls.tiny_config(1), "unet_chanels": [8]})
    with pytest.raises(ModelError, match="num_organs"):
        build_method(name, {k: v for k, v in cls.tiny_config(1).items() if k != "num_organs"})
    tiny = cls.tiny_config(3)
    assert tiny["num_organs"] == 3 and set(tiny) == set(cls.default_config(3))
    # a partial config is completed from the defaults, and the completed one is what is stored
    partial = build_method(name, {**{k: tiny[k] for k in tiny if k.startswith(("unet", "image", "mask", "norm", "prompt"))},
                                  "num_organs": 3})
    assert partial.config == tiny
    # tuples normalise to JSON lists, so model.json round-trips to an equal config
    m = build_method(name, {**tiny, "unet_channels": (16, 16)})
    assert m.config["unet_channels"] == [16, 16]


@pytest.mark.parametrize("name", METHODS)
def test_default_config_geometry(name):
    """The real config takes 224×224 windows (latent 28 → 14 → 7) and rejects sizes its UNet cannot halve."""
    torch.manual_seed(0)
    m = build_method(name, _METHODS[name].default_config(4)).eval()
    cfg = m.config
    assert cfg["unet_attention_levels"] == [False, False, True]
    assert 28 % (2 ** (len(cfg["unet_channels"]) - 1)) == 0
    probs = m(torch.zeros(1, 1, 224, 224), torch.tensor([3]), 1, 1, _gen(0))
    assert probs.shape == (1, 1, 224, 224)
    with pytest.raises(ValueError):
        m.condition(torch.zeros(1, 1, 200, 200))  # 25-pixel latent: not divisible by 4
