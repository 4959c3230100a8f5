"""A generic reverse-diffusion loop over diffusers schedulers.

Every scheduler runs in epsilon mode. A model that predicts ``x0`` has its prediction turned
into the implied noise with the scheduler's own ``ᾱ_t``, ``ε = (x_t − sqrt(ᾱ)·x0)/sqrt(1−ᾱ)``;
the scheduler then recovers exactly that ``x0`` inside ``step``. The same route clips ``x0``
to the latent range for every scheduler alike (diffusers' own ``clip_sample`` exists only for
some of them).

Sigma-based schedulers (Euler ancestral) keep their sample in "sigma space"
(``x0 + σ·ε``); the loop multiplies the initial noise by ``init_noise_sigma`` and always gives
the model ``scale_model_input(x, t)``, which is the variance-preserving ``x_t`` the networks
were trained on, with ``ᾱ = 1/(1+σ²)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .schedulers import (
    DEFAULT_BETA_END,
    DEFAULT_BETA_SCHEDULE,
    DEFAULT_BETA_START,
    DEFAULT_NUM_TRAIN_TIMESTEPS,
    eps_to_x0,
    make_scheduler,
    x0_to_eps,
)

#: ``predict(x_t, t) -> prediction``: ``x_t`` variance-preserving ``[B,...]``, ``t`` float ``[B]``.
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "sample")


def _step_accepts_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def run_reverse(
    predict: Predictor,
    x_T: torch.Tensor,
    scheduler_name: str = "ddim",
    steps: int = 4,
    generator: torch.Generator | None = None,
    *,
    prediction_type: str = "epsilon",
    clip: float | None = None,
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = DEFAULT_BETA_SCHEDULE,
    beta_start: float = DEFAULT_BETA_START,
    beta_end: float = DEFAULT_BETA_END,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run ``steps`` reverse steps from standard-normal noise ``x_T``; return the final ``x0``.

    ``predict`` returns ``ε`` (``prediction_type="epsilon"``) or ``x0`` (``"sample"``).
    With ``clip`` set, every ``x0`` estimate — and the result — is clamped to ``[-clip, clip]``.
    A fresh scheduler is made for this call; ``generator`` drives the stochastic schedulers
    (Euler ancestral, DDPM), so the same seed gives the same result. The loop state is kept in
    float32 on ``x_T``'s device; the model sees ``x_T``'s dtype; the result has ``x_T``'s dtype.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the {num_train_timesteps} training timesteps")
    scheduler = make_scheduler(
        scheduler_name, num_train_timesteps, beta_schedule, beta_start, beta_end, **(scheduler_kwargs or {})
    )
    device, model_dtype = x_T.device, x_T.dtype
    scheduler.set_timesteps(steps, device=device)
    step_kwargs = {"generator": generator} if _step_accepts_generator(scheduler) else {}
    sigmas = getattr(scheduler, "sigmas", None)
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    batch = x_T.shape[0]

    x = x_T.to(torch.float32) * float(scheduler.init_noise_sigma)
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if sigmas is not None:  # sigma-parameterised schedulers: ᾱ from the sigma they step with
            sigma = float(sigmas[i])
            alpha_bar = 1.0 / (1.0 + sigma * sigma)
        else:
            alpha_bar = float(alphas_cumprod[int(t)])
        t_batch = torch.full((batch,), float(t), device=device, dtype=torch.float32)
        out = predict(x_in.to(model_dtype), t_batch).to(torch.float32)
        if prediction_type == "epsilon" and clip is None:
            eps = out
        else:
            x0 = out if prediction_type == "sample" else eps_to_x0(x_in, out, alpha_bar)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            eps = x0_to_eps(x_in, x0, alpha_bar)
        output = scheduler.step(eps, t, x, **step_kwargs)
        x = output.prev_sample
    # Schedulers that report their x0 estimate (DDIM, DDPM, Euler ancestral) end on it: DDIM with
    # a step count that does not divide the training timesteps otherwise stops at t=0, not at x0.
    # The multistep solvers (DPM-Solver++, UniPC) end at sigma 0, i.e. on their own x0.
    final_x0 = getattr(output, "pred_original_sample", None)
    if final_x0 is not None:
        x = final_x0
    if clip is not None:
        x = x.clamp(-clip, clip)
    return x.to(model_dtype)
