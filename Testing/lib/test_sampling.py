"""Scheduler factory, noise-schedule arithmetic and the generic reverse loop."""

from __future__ import annotations

import pytest
import torch

from MedDiffSegLib.sampling import (
    SCHEDULERS,
    add_noise,
    alphas_cumprod,
    eps_to_x0,
    make_scheduler,
    randint,
    randn,
    run_reverse,
    x0_to_eps,
)



pytestmark = pytest.mark.usefixtures("one_thread")


def test_scheduler_names_and_classes():
    import diffusers

    assert SCHEDULERS[0] == "ddim"
    expected = {
        "ddim": diffusers.DDIMScheduler,
        "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "lms": diffusers.LMSDiscreteScheduler,
    }
    assert set(SCHEDULERS) == set(expected)
    for name, cls in expected.items():
        s = make_scheduler(name, num_train_timesteps=500)
        assert isinstance(s, cls)
        assert s.config.num_train_timesteps == 500
        assert s.config.prediction_type == "epsilon"
        assert s.config.timestep_spacing == "trailing"
    assert make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert isinstance(make_scheduler(), diffusers.DDIMScheduler)


def test_scheduler_is_fresh_each_call():
    a, b = make_scheduler("dpmsolver++"), make_scheduler("dpmsolver++")
    assert a is not b
    a.set_timesteps(4)
    assert b.num_inference_steps is None


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_scheduler("heun")
    for name in SCHEDULERS:
        assert name in str(err.value)


def test_trailing_timesteps_start_at_pure_noise():
    for name in SCHEDULERS:
        s = make_scheduler(name)
        s.set_timesteps(4)
        assert int(s.timesteps[0]) == 999, name


@pytest.mark.parametrize("schedule, start, end, steps", [
    ("scaled_linear", 0.00085, 0.012, 1000), ("linear", 1e-4, 0.02, 1000), ("linear", 1e-4, 0.02, 500),
])
def test_alphas_cumprod_matches_schedulers(schedule, start, end, steps):
    # computed without diffusers for these schedules: must stay the table every scheduler reverses
    ac = alphas_cumprod(steps, schedule, start, end)
    assert ac.dtype == torch.float32 and ac.shape == (steps,)
    for name in SCHEDULERS:
        assert torch.equal(make_scheduler(name, steps, schedule, start, end).alphas_cumprod.float(), ac), name
    assert bool((ac[1:] < ac[:-1]).all())


def test_one_step_model_loads_and_samples_without_importing_diffusers(tmp_path):
    # start-up time: diffusers (and the torch._dynamo it imports) is only needed for multi-step schedulers
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from MedDiffSegLib.registry.store import default_model_for\n"
        "pkg = default_model_for('CT')\n"
        "m = pkg.load_method('cpu').eval()\n"
        "with torch.inference_mode():\n"
        "    c = m.condition(torch.zeros(1, m.image_channels, 64, 64))\n"
        "    p = m.sample(c, torch.zeros(1, dtype=torch.long), 2, 1, torch.Generator().manual_seed(0), None)\n"
        "assert p.shape == (1, 2, 64, 64), p.shape\n"
        "print('diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_noise_arithmetic_round_trips():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 4, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(5, 4, 3, 3, generator=g)
    a = alphas_cumprod()[torch.tensor([0, 10, 500, 900, 999])]
    xt = add_noise(x0, eps, a)
    # latent estimation gives x0 back exactly when the predicted noise is the true noise
    torch.testing.assert_close(eps_to_x0(xt, eps, a), x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(x0_to_eps(xt, x0, a), eps, rtol=0, atol=1e-5)
    # scalar ᾱ broadcasts too
    torch.testing.assert_close(x0_to_eps(add_noise(x0, eps, 0.3), x0, 0.3), eps, rtol=0, atol=1e-5)


def test_randn_and_randint_follow_the_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(randn((2, 3), g1, "cpu"), randn((2, 3), g2, "cpu"))
    assert torch.equal(randint(10, (7,), g1, "cpu"), randint(10, (7,), g2, "cpu"))
    assert randn((2,), None, "cpu", torch.float64).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_randn_cpu_generator_cuda_tensor():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = randn((4,), g1, "cuda")
    assert a.device.type == "cuda"
    assert torch.equal(a.cpu(), randn((4,), g2, "cpu"))


def _constant_x0_predictor(x0):
    return lambda x, t: x0.expand_as(x).to(x.dtype)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_x0_prediction_round_trip_is_exact(name, steps):
    """A model that always predicts the same x0 must end exactly at that x0 for every scheduler."""
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 4, 5, 5, generator=g) * 1.6 - 0.8
    x_T = torch.randn(3, 4, 5, 5, generator=g)
    out = run_reverse(_constant_x0_predictor(target), x_T, name, steps, torch.Generator().manual_seed(2),
                      prediction_type="sample")
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_epsilon_prediction_path(name):
    """The ε path: predicting the noise implied by a fixed x0 (with the loop's ᾱ) also ends at x0."""
    ac = alphas_cumprod().double()
    target = torch.full((1, 2, 3, 3), 0.25)

    def predict(x, t):
        assert x.shape == (2, 2, 3, 3) and t.shape == (2,) and t.dtype == torch.float32
        a = float(ac[int(round(float(t[0])))])
        return x0_to_eps(x, target, a)

    x_T = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = run_reverse(predict, x_T, name, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_clip_bounds_x0(name):
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = run_reverse(_constant_x0_predictor(torch.full((1, 1, 4, 4), 5.0)), x_T, name, 3, None,
                      prediction_type="sample", clip=1.0)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-4)


def _nonlinear_predictor(x, t):
    # depends on x and t, so multistep history and noise injection matter
    return torch.tanh(1.5 * x + 0.001 * t.view(-1, 1, 1, 1)) * 0.9


@pytest.mark.parametrize("name", SCHEDULERS)
def test_same_seed_same_result_no_state_leak(name):
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [run_reverse(_nonlinear_predictor, x_T, name, 5, torch.Generator().manual_seed(7), prediction_type="sample")
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.isfinite(runs[0]).all()


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm"])
def test_stochastic_schedulers_use_the_generator(name):
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = run_reverse(_nonlinear_predictor, x_T, name, 4, torch.Generator().manual_seed(1), prediction_type="sample")
    b = run_reverse(_nonlinear_predictor, x_T, name, 4, torch.Generator().manual_seed(2), prediction_type="sample")
    assert not torch.equal(a, b)


def test_dtype_is_preserved_and_model_sees_input_dtype():
    seen = []

    def predict(x, t):
        seen.append(x.dtype)
        return torch.zeros_like(x)

    x_T = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    out = run_reverse(predict, x_T, "dpmsolver++", 3, None, prediction_type="sample")
    assert out.dtype == torch.float64 and set(seen) == {torch.float64}


def test_bad_arguments():
    x_T = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError):
        run_reverse(_nonlinear_predictor, x_T, "ddim", 0)
    with pytest.raises(ValueError):
        run_reverse(_nonlinear_predictor, x_T, "ddim", 2, prediction_type="v")
    with pytest.raises(ValueError, match="valid schedulers"):
        run_reverse(_nonlinear_predictor, x_T, "nope", 2)
