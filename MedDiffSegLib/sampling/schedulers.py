"""Scheduler factory and the small amount of noise-schedule arithmetic the methods share.

The schedulers themselves are diffusers' (never re-implemented here). Every call of
:func:`make_scheduler` returns a *fresh* instance, because diffusers schedulers keep state
between ``step`` calls (step index, multistep history): one scheduler serves one reverse run.

All schedulers are configured in epsilon mode; methods that predict ``x0`` convert their
prediction with :func:`x0_to_eps` (see :mod:`MedDiffSegLib.sampling.loop`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: Noise schedule used when a config does not name one (Stable-Diffusion-style latent schedule).
DEFAULT_BETA_SCHEDULE = "scaled_linear"
DEFAULT_BETA_START = 0.00085
DEFAULT_BETA_END = 0.012
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


def _ddim(**kw):
    from diffusers import DDIMScheduler

    kw.setdefault("clip_sample", False)  # x0 is clipped by the reverse loop, for every scheduler alike
    kw.setdefault("set_alpha_to_one", True)
    return DDIMScheduler(**kw)


def _euler_ancestral(**kw):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(**kw)


def _dpmsolver_pp(**kw):
    from diffusers import DPMSolverMultistepScheduler

    kw.setdefault("algorithm_type", "dpmsolver++")
    kw.setdefault("solver_order", 2)
    return DPMSolverMultistepScheduler(**kw)


def _unipc(**kw):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**kw)


def _ddpm(**kw):
    from diffusers import DDPMScheduler

    kw.setdefault("clip_sample", False)
    return DDPMScheduler(**kw)


def _lms(**kw):
    import importlib.util

    from diffusers import LMSDiscreteScheduler

    if importlib.util.find_spec("scipy") is None:  # diffusers integrates its coefficients with scipy
        raise ImportError("the 'lms' scheduler needs scipy (pip install scipy)")
    return LMSDiscreteScheduler(**kw)


_FACTORIES: dict[str, Callable[..., Any]] = {
    "ddim": _ddim,
    "euler_ancestral": _euler_ancestral,
    "dpmsolver++": _dpmsolver_pp,
    "unipc": _unipc,
    "ddpm": _ddpm,
    "lms": _lms,
}

#: Valid scheduler names, the default first.
SCHEDULERS: tuple[str, ...] = tuple(_FACTORIES)


def make_scheduler(
    name: str = "ddim",
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = DEFAULT_BETA_SCHEDULE,
    beta_start: float = DEFAULT_BETA_START,
    beta_end: float = DEFAULT_BETA_END,
    **kw: Any,
):
    """A fresh diffusers scheduler in epsilon mode.

    ``name`` is one of :data:`SCHEDULERS`. Timesteps are spaced ``"trailing"`` unless ``kw``
    says otherwise, so a reverse run of any length starts at the last training timestep
    (pure noise) and ends at ``x0``. Extra keyword arguments go to the scheduler's constructor.
    """
    key = str(name).strip().lower() if name is not None else "ddim"
    if key not in _FACTORIES:
        raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    kw.setdefault("timestep_spacing", "trailing")
    kw.setdefault("prediction_type", "epsilon")
    return _FACTORIES[key](
        num_train_timesteps=int(num_train_timesteps),
        beta_schedule=str(beta_schedule),
        beta_start=float(beta_start),
        beta_end=float(beta_end),
        **kw,
    )


def alphas_cumprod(
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = DEFAULT_BETA_SCHEDULE,
    beta_start: float = DEFAULT_BETA_START,
    beta_end: float = DEFAULT_BETA_END,
) -> torch.Tensor:
    """``ᾱ_t`` for ``t = 0..T-1`` (float32), exactly as the schedulers compute it.

    Training uses this table, so the forward process the networks learn is the one every
    scheduler in :data:`SCHEDULERS` reverses.
    """
    if beta_schedule in ("linear", "scaled_linear"):
        # diffusers' own arithmetic for these two schedules (float32 linspace, cumprod), done here so
        # that loading a model does not import diffusers (and the torch._dynamo it pulls in: ~2.5 s of
        # start-up) when it samples in one step and never needs a scheduler. Tested equal bit for bit.
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, int(num_train_timesteps), dtype=torch.float32)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, int(num_train_timesteps), dtype=torch.float32) ** 2
        return torch.cumprod(1.0 - betas, dim=0)
    sched = make_scheduler("ddpm", num_train_timesteps, beta_schedule, beta_start, beta_end)
    return sched.alphas_cumprod.detach().clone().to(torch.float32)


def _bcast(a: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Forward process ``x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε`` (``alpha_bar`` scalar or one per row)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Latent estimation: ``x0 = (x_t − sqrt(1−ᾱ)·ε) / sqrt(ᾱ)``."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The noise implied by an ``x0`` prediction: ``ε = (x_t − sqrt(ᾱ)·x0) / sqrt(1−ᾱ)``."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise from ``generator``; drawn on the generator's device, then moved."""
    device = torch.device(device)
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    gdev = generator.device
    if gdev.type != device.type or (gdev.index is not None and device.index is not None and gdev.index != device.index):
        return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` (long) from ``generator``; drawn on its device, then moved."""
    device = torch.device(device)
    if generator is None:
        return torch.randint(0, int(high), tuple(shape), device=device)
    return torch.randint(0, int(high), tuple(shape), generator=generator, device=generator.device).to(device)
