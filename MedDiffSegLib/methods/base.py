"""The Method seam: what differs between the papers.

A method is a ``torch.nn.Module`` built from a plain-dict config (diffusers style: the config
is saved in ``model.json`` and the module is rebuilt from it before the safetensors weights
are loaded). The volume engine only ever talks to this interface.

Shapes (``B`` windows, ``N`` samples, ``H×W`` window size, all float32):

- ``condition(images[B,1,H,W]) -> cond``: everything that depends on the image alone (the
  image encoder). The engine calls it once per window and reuses ``cond`` for every organ
  and sample.
- ``expand_condition(cond, repeats)``: repeat each window's condition ``repeats`` times
  (``repeat_interleave`` on the batch dimension), so one window serves several organs.
- ``sample(cond, organ_ids[B'], num_samples, steps, generator, scheduler) -> probs[B',N,H,W]``:
  foreground probabilities in [0, 1] for each row of ``cond`` prompted with ``organ_ids``.
- ``forward(images, organ_ids, num_samples, steps, generator)``: the two above in one call.
- ``training_loss(images[B,1,H,W], masks[B,1,H,W] in {0,1}, organ_ids[B], generator=None)``
  returns a dict of scalar tensors with the key ``"loss"`` being the one to back-propagate.

Randomness comes only from the ``generator`` passed in, so a fixed seed gives identical
results on CPU.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ModelError

_METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method constructible by its ``name`` from a model package."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty class attribute 'name'")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_METHODS)


def build_method(name: str, config: dict[str, Any]) -> "Method":
    """Instantiate method ``name`` from its config dict (as stored in ``model.json``)."""
    _import_builtin_methods()
    if name not in _METHODS:
        raise ModelError(f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name].from_config(config)


def _import_builtin_methods() -> None:
    """Import every module of this package once: their ``@register_method`` decorators run."""
    import importlib
    import pkgutil

    from .. import methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


class Method(nn.Module, abc.ABC):
    name: ClassVar[str] = ""
    #: Scheduler used when the caller does not name one.
    default_scheduler: ClassVar[str] = "ddim"
    #: Training stages in order (e.g. mask autoencoder first, then the denoiser).
    stages: ClassVar[tuple[str, ...]] = ("denoiser",)

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Method":
        return cls(config)

    @property
    def num_organs(self) -> int:
        return int(self.config["num_organs"])

    # -- inference -----------------------------------------------------------------------
    @abc.abstractmethod
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        """Encode image windows ``[B,1,H,W]`` once; the result is reused for all organs and samples."""

    def expand_condition(self, cond: torch.Tensor, repeats: int) -> torch.Tensor:
        return cond if repeats == 1 else cond.repeat_interleave(repeats, dim=0)

    @abc.abstractmethod
    def sample(
        self,
        cond: torch.Tensor,
        organ_ids: torch.Tensor,
        num_samples: int,
        steps: int,
        generator: torch.Generator | None,
        scheduler: str | None = None,
    ) -> torch.Tensor:
        """Foreground probabilities ``[B,N,H,W]`` in [0, 1]."""

    def forward(
        self,
        images: torch.Tensor,
        organ_ids: torch.Tensor,
        num_samples: int = 1,
        steps: int = 1,
        generator: torch.Generator | None = None,
        scheduler: str | None = None,
    ) -> torch.Tensor:
        return self.sample(self.condition(images), organ_ids, num_samples, steps, generator, scheduler)

    # -- helpers shared by the methods ---------------------------------------------------
    def _check_organs(self, organ_ids: torch.Tensor, rows: int) -> torch.Tensor:
        organ_ids = torch.as_tensor(organ_ids)
        if organ_ids.shape != (rows,):
            raise ValueError(f"organ_ids must have shape [{rows}], got {list(organ_ids.shape)}")
        if rows and (int(organ_ids.min()) < 0 or int(organ_ids.max()) >= self.num_organs):
            raise ValueError(f"organ ids must be in [0, {self.num_organs}), got {organ_ids.tolist()}")
        return organ_ids.long()

    def _alpha_bar(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """ᾱ_t from the method's ``_alphas_cumprod`` table (float64 on CPU), as float32 on ``device``."""
        return self._alphas_cumprod[t.long().cpu()].to(device=device, dtype=torch.float32)

    # -- training ------------------------------------------------------------------------
    @abc.abstractmethod
    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        organ_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        stage: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch of ``stage`` (default: the last stage); ``"loss"`` is the total."""

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters trained in ``stage`` (the others are frozen during it)."""
        return [p for p in self.parameters() if p.requires_grad]

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        """A very small config for fast CPU tests (random weights, windows of 32×32)."""
        raise NotImplementedError
