"""Reverse-process sampling: diffusers schedulers behind one factory, and a generic loop."""

from .loop import PREDICTION_TYPES, run_reverse
from .schedulers import (
    DEFAULT_BETA_END,
    DEFAULT_BETA_SCHEDULE,
    DEFAULT_BETA_START,
    DEFAULT_NUM_TRAIN_TIMESTEPS,
    SCHEDULERS,
    add_noise,
    alphas_cumprod,
    eps_to_x0,
    make_scheduler,
    randint,
    randn,
    x0_to_eps,
)

__all__ = [
    "DEFAULT_BETA_END",
    "DEFAULT_BETA_SCHEDULE",
    "DEFAULT_BETA_START",
    "DEFAULT_NUM_TRAIN_TIMESTEPS",
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "add_noise",
    "alphas_cumprod",
    "eps_to_x0",
    "make_scheduler",
    "randint",
    "randn",
    "run_reverse",
    "x0_to_eps",
]
