"""The contract of the Method seam, checked for every registered method (tiny random models, CPU).

What the volume engine, the trainer and the package loader rely on, whatever the method:
sampling shapes, range and seeds with every scheduler; a fresh scheduler per call; the default
scheduler; reusing, expanding and selecting a condition; organ prompts; argument checks with
clear messages; training losses that follow the generator and train exactly a stage's
parameters; configs that round-trip through JSON and safetensors and are completed and checked;
the real config on 224×224 windows. What is particular to a method is tested in its own file
(``test_methods.py`` for ``sdseg``/``guided``, ``test_meddelinea.py``, ``test_medsegdiff_v2.py``,
``test_dts.py``).
"""

from __future__ import annotations

import json

import pytest
import torch

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.methods.base import _METHODS, build_method
from MedDiffSegLib.sampling import SCHEDULERS, add_noise, alphas_cumprod
from tinymodels import builtin_methods, tiny_method, wake_control

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = builtin_methods()
B, H, W = 2, 32, 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(name: str, seed: int = 0, **overrides):
    """The tiny model of ``name`` (two organs), every path live (meddelinea's zero-initialised control woken)."""
    m = tiny_method(name, 2, seed, **overrides).eval()
    wake_control(m)
    return m


@pytest.fixture(scope="module", params=METHODS)
def method(request):
    """One tiny model per method, shared by the tests that only sample from it."""
    return _build(request.param)


def test_every_built_in_method_is_covered():
    assert set(METHODS) >= {"sdseg", "guided", "meddelinea", "medsegdiff_v2", "dts"}


@pytest.mark.parametrize("name", METHODS)
def test_registered_with_a_known_default_scheduler_and_stages(name):
    cls = _METHODS[name]
    assert cls.name == name and cls.default_scheduler in SCHEDULERS
    assert cls.stages and cls.stages[-1] == "denoiser" and len(set(cls.stages)) == len(cls.stages)
    assert cls.prediction_type in ("epsilon", "sample")


# -- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4])
def test_sample_shape_range_and_seeds(method, images, scheduler, steps):
    cond = method.condition(images)
    organs = torch.tensor([1, 0])
    a = method.sample(cond, organs, 3, steps, _gen(5), scheduler)
    assert a.shape == (B, 3, H, W) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    b = method.sample(cond, organs, 3, steps, _gen(5), scheduler)  # a second call: no scheduler state leaks
    c = method.sample(cond, organs, 3, steps, _gen(6), scheduler)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[:, 0], a[:, 1])  # the N chains of one row are different samples
    assert torch.equal(method(images, organs, 3, steps, _gen(5), scheduler), a)  # forward = condition + sample


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc", "lms"])
def test_history_schedulers_are_fresh_per_call(method, images, scheduler):
    """Multistep schedulers keep history between steps; a fresh one per call keeps calls independent."""
    cond = method.condition(images)
    organs = torch.tensor([0, 1])
    first = method.sample(cond, organs, 2, 5, _gen(1), scheduler)
    method.sample(cond, organs, 4, 3, _gen(2), scheduler)  # a different run in between
    assert torch.equal(first, method.sample(cond, organs, 2, 5, _gen(1), scheduler))


def test_no_scheduler_means_the_methods_default(method, images):
    cond = method.condition(images)
    organs = torch.tensor([0, 1])
    default = method.sample(cond, organs, 2, 3, _gen(1))
    assert torch.equal(default, method.sample(cond, organs, 2, 3, _gen(1), method.default_scheduler))
    other = "unipc" if method.default_scheduler != "unipc" else "ddim"
    assert not torch.equal(default, method.sample(cond, organs, 2, 3, _gen(1), other))


def test_condition_reuse_is_exact(method, images):
    """condition once + expand_condition for 2 organs == forward on each (window, organ) row."""
    cond = method.condition(images)
    expanded = method.expand_condition(cond, 2)
    organs = torch.tensor([0, 1] * B)  # window-major, organ-minor (repeat_interleave)
    for steps in (1, 3):
        reused = method.sample(expanded, organs, 2, steps, _gen(9), None)
        direct = method(images.repeat_interleave(2, dim=0), organs, 2, steps, _gen(9))
        torch.testing.assert_close(reused, direct, rtol=0, atol=1e-5)
    # per organ: sampling the condition for organ k equals forward() for organ k alone
    for k in (0, 1):
        torch.testing.assert_close(method.sample(cond, torch.full((B,), k), 1, 1, _gen(4), None),
                                   method(images, torch.full((B,), k), 1, 1, _gen(4)), rtol=0, atol=1e-6)
    assert method.expand_condition(cond, 1) is cond


def test_select_condition_samples_the_chosen_windows_as_if_encoded_alone(method):
    """The engine samples only the windows that still need samples, from the batch's condition."""
    imgs = torch.rand(3, method.image_channels, H, W, generator=_gen(5)) * 2 - 1
    cond = method.condition(imgs)
    for rows in ([2], [0, 2], [1, 0]):
        r = torch.tensor(rows)
        organs = torch.tensor([1] * len(rows))
        picked = method.sample(method.select_condition(cond, r), organs, 2, 1, _gen(8), None)
        alone = method.sample(method.condition(imgs[r]), organs, 2, 1, _gen(8), None)
        torch.testing.assert_close(picked, alone, rtol=0, atol=1e-4)  # batch-size effects in the kernels only
    with pytest.raises((IndexError, RuntimeError)):
        method.select_condition(cond, torch.tensor([3]))


@pytest.mark.parametrize("steps", [1, 2])
def test_organ_prompt_and_image_change_the_output(method, images, steps):
    cond = method.condition(images)
    a = method.sample(cond, torch.tensor([0, 0]), 1, steps, _gen(3))
    b = method.sample(cond, torch.tensor([1, 1]), 1, steps, _gen(3))
    c = method(images.flip(-1), torch.tensor([0, 0]), 1, steps, _gen(3))
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_input_validation(method, images, masks):
    multiples = [k for k, _ in method._window_multiples()]
    assert multiples and max(multiples) == method.size_multiple and H % method.size_multiple == 0
    for k in multiples:  # a side that is a multiple of k/2 but not of k
        with pytest.raises(ValueError, match=f"divisible by {k}"):
            method.condition(torch.zeros(1, 1, H + k // 2, W))
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        method.condition(torch.zeros(1, 2, H, W))
    cond = method.condition(images)
    with pytest.raises(ValueError, match="organ ids must be in"):
        method.sample(cond, torch.tensor([0, 2]), 1, 1, None)
    with pytest.raises(ValueError, match="organ_ids must have shape"):
        method.sample(cond, torch.tensor([0]), 1, 1, None)
    with pytest.raises(ValueError, match="valid schedulers"):
        method.sample(cond, torch.tensor([0, 1]), 1, 2, None, "heun")
    for n, k in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            method.sample(cond, torch.tensor([0, 1]), n, k, None)
    with pytest.raises(ValueError, match=r"condition\(\)"):  # the raw windows are no condition
        method.sample(images, torch.tensor([0, 1]), 1, 1, None)
    with pytest.raises(ValueError, match="stage"):
        method.training_loss(images, masks, torch.tensor([0, 1]), stage="nope")
    with pytest.raises(ValueError, match="stage"):
        method.stage_parameters("nope")
    for stage in method.stages:
        with pytest.raises(ValueError):
            method.training_loss(images, torch.zeros(B, 1, 24, 24), torch.tensor([0, 1]), stage=stage)
    with pytest.raises(ValueError, match="differ"):
        method.training_loss(images, masks[:1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="organ"):
        method.training_loss(images, masks, torch.tensor([0, 5]))


@pytest.mark.parametrize("name", METHODS)
def test_predicted_x0_undoes_the_noising_on_the_samplers_schedule(name):
    """With the true prediction (the noise, or x0 itself) the x0 estimate is x0 at every timestep; ᾱ is the
    one of the diffusers schedule the samplers use."""
    m = _build(name)
    g = _gen(0)
    x0 = torch.rand(4, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(4, 4, 4, 4, generator=g)
    a = m._alpha_bar(torch.tensor([0, 250, 700, 999]), x0.device)
    x_t = add_noise(x0, eps, a)
    torch.testing.assert_close(m.predicted_x0(x_t, eps if m.prediction_type == "epsilon" else x0, a), x0,
                               rtol=0, atol=2e-4)
    torch.testing.assert_close(m._alpha_bar(torch.arange(m.config["num_train_timesteps"]), x0.device),
                               alphas_cumprod(**m._schedule()), rtol=0, atol=1e-7)
    assert m._alphas_cumprod.dtype == torch.float64 and not any("alphas" in k for k in m.state_dict())


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_training_loss_follows_the_generator(name, images, masks):
    m = _build(name)
    organs = torch.tensor([0, 1])
    for stage in m.stages:
        with torch.no_grad():
            a = m.training_loss(images, masks, organs, _gen(3), stage)
            b = m.training_loss(images, masks, organs, _gen(3), stage)
            c = m.training_loss(images, masks, organs, _gen(4), stage)
        assert "loss" in a and all(v.ndim == 0 and torch.isfinite(v) for v in a.values()), stage
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}, stage
        if stage == "denoiser":  # the timesteps and the noise come from the generator
            assert float(a["loss"]) != float(c["loss"])
    assert set(m.training_loss(images, masks, organs, _gen(3))) == set(a)  # default: the last stage


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_the_stages_parameters_and_no_other(name, images, masks):
    """As the trainer runs a stage: only its parameters require gradients; they get some, the others none."""
    m = _build(name).train()
    organs = torch.tensor([0, 1])
    for stage in m.stages:
        trained = {id(p) for p in m.stage_parameters(stage)}
        assert trained and trained <= {id(p) for p in m.parameters()}
        for p in m.parameters():
            p.requires_grad_(id(p) in trained)
            p.grad = None
        m.training_loss(images, masks, organs, _gen(3), stage)["loss"].backward()
        assert sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None) > 0, stage
        assert all(p.grad is None for p in m.parameters() if id(p) not in trained), stage


# -- configs and persistence -------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip_and_safetensors(name, images, tmp_path):
    from safetensors.torch import load_file, save_file

    m = _build(name, seed=11)
    cfg = json.loads(json.dumps(m.config))  # as stored in model.json
    assert cfg == m.config
    path = tmp_path / "w.safetensors"
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
    torch.manual_seed(999)  # a different init: the weights must come from the file
    m2 = build_method(name, cfg).eval()
    assert m2.config == m.config
    m2.load_state_dict(load_file(str(path)), strict=True)
    organs = torch.tensor([1, 0])
    for steps, sched in ((1, None), (3, None), (3, "unipc"), (2, "ddpm")):
        torch.testing.assert_close(m(images, organs, 2, steps, _gen(0), sched), m2(images, organs, 2, steps, _gen(0), sched),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_config_is_completed_from_the_defaults_and_checked(name):
    cls = _METHODS[name]
    tiny, default = cls.tiny_config(3), cls.default_config(3)
    assert tiny["num_organs"] == 3 and set(tiny) == set(default)
    with pytest.raises(ModelError, match="unknown keys"):
        build_method(name, {**tiny, "no_such_key": 8})
    with pytest.raises(ModelError, match="num_organs"):
        build_method(name, {k: v for k, v in tiny.items() if k != "num_organs"})
    # a partial config is completed from the defaults, and the completed one is what is stored
    partial = {k: v for k, v in tiny.items() if k == "num_organs" or v != default[k]}
    assert len(partial) < len(tiny) and build_method(name, partial).config == tiny
    # tuples normalise to JSON lists; a value of the wrong type is refused, naming the key
    key = next(k for k, v in tiny.items() if isinstance(v, list))
    assert build_method(name, {**tiny, key: tuple(tiny[key])}).config[key] == tiny[key]
    key = next(k for k, v in tiny.items() if type(v) is int and k != "num_organs")
    with pytest.raises(ModelError, match=f"{key} must be an integer"):
        build_method(name, {**tiny, key: 2.5})


@pytest.mark.parametrize("name", METHODS)
def test_default_config_takes_224_windows(name):
    """The real config takes 224×224 windows (2 mm: the shipped packages') and refuses sizes it cannot halve."""
    torch.manual_seed(0)
    m = build_method(name, _METHODS[name].default_config(4)).eval()
    assert 224 % m.size_multiple == 0
    probs = m(torch.zeros(1, 1, 224, 224), torch.tensor([3]), 1, 1, _gen(0))
    assert probs.shape == (1, 1, 224, 224)
    with pytest.raises(ValueError, match="divisible"):
        m.condition(torch.zeros(1, 1, 200, 200))
