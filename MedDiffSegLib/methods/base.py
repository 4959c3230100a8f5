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
- ``select_condition(cond, rows)``: the condition of some windows only (``rows``: long tensor
  of row indices), so that windows that need more samples are sampled without re-encoding.
- ``sample(cond, organ_ids[B'], num_samples, steps, generator, scheduler) -> probs[B',N,H,W]``:
  foreground probabilities in [0, 1] for each row of ``cond`` prompted with ``organ_ids``; a method
  implements ``_sample`` with the same arguments, ``num_samples``, ``steps`` and ``scheduler`` checked.
- ``forward(images, organ_ids, num_samples, steps, generator)``: the two above in one call.
- ``training_loss(images[B,1,H,W], masks[B,1,H,W] in {0,1}, organ_ids[B], generator=None, stage=None)``
  returns a dict of scalar tensors with the key ``"loss"`` being the one to back-propagate; a method
  implements ``_stage_loss(stage, images, masks, organ_ids, generator)``, ``stage`` checked.

Randomness comes only from the ``generator`` passed in, so a fixed seed gives identical
results on CPU.

What the methods share lives here once: the argument checks (:meth:`Method._check_sampling`,
:meth:`Method._check_organs`, :meth:`Method._check_stage`, :meth:`Method._check_window_shape`,
:meth:`Method._check_pair`, :meth:`Method._check_latent_condition`), the reverse process's
scaffolding (:meth:`Method._per_sample` repeats each row's condition for its ``N`` chains,
:meth:`Method._starting_noise` draws ``x_T``, :meth:`Method._single_step` is the one-step path from
pure noise at the last training timestep, :meth:`Method._denoise` picks it or the scheduler's loop)
and the training draw (:meth:`Method._noised`: a timestep and noise per row, in that order).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ModelError
from ..sampling import DEFAULT_BETA_END, DEFAULT_BETA_SCHEDULE, DEFAULT_BETA_START, DEFAULT_NUM_TRAIN_TIMESTEPS
from ..sampling import SCHEDULERS, add_noise, alphas_cumprod, eps_to_x0, randint, randn, run_reverse

#: The noise schedule of the methods that diffuse a latent (Stable Diffusion's), in config keys.
LATENT_SCHEDULE: dict[str, Any] = {"num_train_timesteps": DEFAULT_NUM_TRAIN_TIMESTEPS, "beta_schedule": DEFAULT_BETA_SCHEDULE,
                                   "beta_start": DEFAULT_BETA_START, "beta_end": DEFAULT_BETA_END}
#: The noise schedule of the methods that diffuse the mask itself in [-1, 1] (DDPM's linear one, 1000 steps).
PIXEL_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                                  "beta_end": 0.02}

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
    #: The method in one line (``meddiffseg train --help``, the Slicer model list): a string literal, read
    #: from the source without importing the method (:func:`MedDiffSegLib.registry.card.method_summaries`).
    summary: ClassVar[str] = ""
    #: Scheduler used when the caller does not name one.
    default_scheduler: ClassVar[str] = "ddim"
    #: Training stages in order (e.g. mask autoencoder first, then the denoiser).
    stages: ClassVar[tuple[str, ...]] = ("denoiser",)
    #: What the denoiser predicts: "epsilon" (the noise) or "sample" (x0); see :meth:`predicted_x0`.
    prediction_type: ClassVar[str] = "epsilon"

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Method":
        return cls(config)

    @property
    def num_organs(self) -> int:
        return int(self.config["num_organs"])

    @property
    def prompt_channels(self) -> int:
        """Channels of the interactive prompt maps a row can take (0: the method takes none).

        A method with prompt channels accepts ``prompts`` ``[B',P,H,W]`` in :meth:`sample` and
        :meth:`training_loss`: per organ row, the user's clicks, box and previous mask on the
        window's grid (:mod:`MedDiffSegLib.interactive.prompts`). ``None`` (or all zeros) is the
        automatic segmentation.
        """
        return int(self.config.get("prompt_channels", 0))

    def _check_prompts(self, prompts: torch.Tensor, rows: int, h: int, w: int) -> None:
        if self.prompt_channels == 0:
            raise ValueError(f"this {self.name} model takes no interactive prompts (it was trained without them)")
        if prompts.ndim != 4 or tuple(prompts.shape) != (rows, self.prompt_channels, h, w):
            raise ValueError(f"prompts must have shape [{rows},{self.prompt_channels},{h},{w}], got {list(prompts.shape)}")

    @property
    def image_channels(self) -> int:
        """Input channels of an image window: the slices of its axial context (1 = the slice alone)."""
        return int(self.config.get("image_channels", 1))

    # -- inference -----------------------------------------------------------------------
    @abc.abstractmethod
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        """Encode image windows ``[B,1,H,W]`` once; the result is reused for all organs and samples."""

    def expand_condition(self, cond: torch.Tensor, repeats: int) -> torch.Tensor:
        return cond if repeats == 1 else cond.repeat_interleave(repeats, dim=0)

    def select_condition(self, cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The condition of the windows ``rows`` (a long tensor of row indices) only: the engine samples
        the windows that still need samples without encoding them again."""
        return cond[rows]

    def sample(
        self,
        cond: torch.Tensor,
        organ_ids: torch.Tensor,
        num_samples: int,
        steps: int,
        generator: torch.Generator | None,
        scheduler: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Foreground probabilities ``[B,N,H,W]`` in [0, 1] (without gradients), from :meth:`_sample`.

        ``num_samples`` and ``steps`` must be >= 1; ``scheduler`` None means :attr:`default_scheduler`.
        Methods with :attr:`prompt_channels` also take ``prompts=`` (``[B,P,H,W]`` or None).
        """
        num_samples, steps, scheduler = self._check_sampling(num_samples, steps, scheduler)
        with torch.no_grad():
            return self._sample(cond, organ_ids, num_samples, steps, generator, scheduler, **kwargs)

    def _sample(self, cond, organ_ids: torch.Tensor, num_samples: int, steps: int, generator: torch.Generator | None,
                scheduler: str, **kwargs) -> torch.Tensor:
        """The method's sampling: :meth:`sample` with its arguments checked and the scheduler named."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sampling")

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

    @property
    def _alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of every training timestep from the same diffusers code the schedulers use (:meth:`_schedule`).

        Made on first use and kept as a plain attribute (not a buffer), so that it stays float64 on the CPU
        whatever dtype or device the module is moved to, and stays out of the state dict.
        """
        table = self.__dict__.get("_alphas_cumprod_table")
        if table is None:
            table = self.__dict__["_alphas_cumprod_table"] = alphas_cumprod(**self._schedule()).to(torch.float64)
        return table

    def _alpha_bar(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """ᾱ_t from the method's ``_alphas_cumprod`` table (float64 on CPU), as float32 on ``device``."""
        return self._alphas_cumprod[t.long().cpu()].to(device=device, dtype=torch.float32)

    # -- starting from another model -----------------------------------------------------------
    def _pretrained_package_state(self, path, same_method: bool = True) -> tuple[Any, dict[str, torch.Tensor], Any]:
        """``(weights path, state dict, package or None)`` of a trained package of this method (of any
        method with ``same_method=False``).

        ``path`` is a package folder (its sha256 is verified), an installed package's name, or
        a ``weights.safetensors`` file. Safetensors only: nothing is unpickled.
        """
        from pathlib import Path

        from safetensors.torch import load_file

        from ..registry import ModelPackage, resolve_model

        p = Path(path).expanduser()
        pkg = None
        if p.is_dir() or (not p.exists() and p.suffix != ".safetensors" and len(p.parts) == 1):
            try:
                pkg = ModelPackage.from_folder(p) if p.is_dir() else resolve_model(str(path))
                pkg.verify()
            except Exception as exc:
                raise ModelError(f"cannot start from {path}: {exc}") from None
            if same_method and pkg.method_name != self.name:
                raise ModelError(f"cannot start from {path}: it is a {pkg.method_name!r} model, not {self.name!r}")
            p = pkg.weights_path
        if not p.is_file():
            raise ModelError(f"pretrained weights {p} do not exist (give a {self.name} model package folder, an "
                             "installed package's name, or its weights.safetensors)")
        try:
            state = load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise ModelError(f"cannot read pretrained weights {p}: {exc}") from None
        return p, state, pkg

    def _copy_pretrained(self, state: dict[str, torch.Tensor], prefixes: tuple[str, ...], source, what: str,
                         fix: str) -> int:
        """Copy every tensor of this model whose name starts with one of ``prefixes`` from ``state`` (all must be
        there with this model's shapes, else a :class:`ModelError` naming ``what``, ``source`` and the ``fix``).
        Returns how many were copied."""
        mine = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
        missing = [k for k in mine if k not in state]
        misshapen = [k for k in mine if k in state and state[k].shape != mine[k].shape]
        if missing or misshapen:
            raise ModelError(f"{what} {source} do not fit this model ({len(missing)} tensors missing, "
                             f"{len(misshapen)} of another shape, e.g. {(missing + misshapen)[:3]}); {fix}")
        with torch.no_grad():
            for k, v in mine.items():
                v.copy_(state[k].to(v.dtype))
        return len(mine)

    # -- training ------------------------------------------------------------------------
    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        organ_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        stage: str | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch of ``stage`` (default: the last stage); ``"loss"`` is the total.

        Methods with :attr:`prompt_channels` also take ``prompts=`` (``[B,P,H,W]`` or None).
        """
        return self._stage_loss(self._check_stage(stage), images, masks, organ_ids, generator, **kwargs)

    def _stage_loss(self, stage: str, images: torch.Tensor, masks: torch.Tensor, organ_ids: torch.Tensor,
                    generator: torch.Generator | None, **kwargs) -> dict[str, torch.Tensor]:
        """The method's loss terms: :meth:`training_loss` with ``stage`` checked (never None)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement training")

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters trained in ``stage`` (the others are frozen during it); by default every parameter."""
        self._check_stage(stage)
        return list(self.parameters())

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        """A very small config for fast CPU tests (random weights, windows of 32×32)."""
        raise NotImplementedError

    @classmethod
    def default_config(cls, num_organs: int) -> dict[str, Any]:
        """The method's real configuration for ``num_organs`` organs: every key it knows, with its default."""
        raise NotImplementedError

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def normalise_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Fill missing keys from :meth:`default_config`, reject unknown ones, use JSON-plain types.

        Every value is coerced to the type of its default (bool, int, float, str, or a list of
        those, element type from the default list), with a :class:`ModelError` naming the key
        when it cannot be; :meth:`check_config` then checks what the types cannot express. The
        normalised config is what the module stores and what a package's ``model.json`` holds.
        """
        if "num_organs" not in config:
            raise ModelError(f"{cls.name} config lacks 'num_organs'")
        num_organs = _coerce(cls.name, "num_organs", config["num_organs"], 1)
        if num_organs < 1:
            raise ModelError(f"{cls.name} config: num_organs must be >= 1, got {num_organs}")
        defaults = cls.default_config(num_organs)
        unknown = sorted(set(config) - set(defaults))
        if unknown:
            raise ModelError(f"{cls.name} config has unknown keys: {', '.join(unknown)}")
        cfg = {**defaults, **config}
        for key, default in defaults.items():
            value = cfg[key]
            if isinstance(default, (list, tuple)):
                if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                    raise ModelError(f"{cls.name} config: {key} must be a list, got {value!r}")
                cfg[key] = [_coerce(cls.name, key, v, _list_element(default)) for v in value]
            elif default is not None:
                cfg[key] = _coerce(cls.name, key, value, default)
        cls.check_config(cfg)
        return cfg

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Method-specific checks of a normalised config (raise :class:`ModelError`); none by default."""

    def _schedule(self) -> dict[str, Any]:
        """The noise schedule shared by training and every scheduler (diffusers' keyword names)."""
        c = self.config
        return {k: c[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}

    # -- argument checks shared by the methods -----------------------------------------------
    def _check_sampling(self, num_samples: int, steps: int, scheduler: str | None) -> tuple[int, int, str]:
        """``(num_samples, steps, scheduler)`` checked, with the method's default scheduler for ``None``."""
        scheduler = scheduler or self.default_scheduler
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")
        num_samples, steps = int(num_samples), int(steps)
        if num_samples < 1 or steps < 1:
            raise ValueError(f"num_samples and steps must be >= 1, got {num_samples} and {steps}")
        return num_samples, steps, scheduler

    def _check_stage(self, stage: str | None) -> str:
        """``stage`` (default: the last one) if the method trains in it."""
        stage = stage or self.stages[-1]
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; {self.name} trains in stages: {', '.join(self.stages)}")
        return stage

    def _check_window_shape(self, x: torch.Tensor, what: str, multiple: int, why: str = "",
                            channels: int = 1) -> None:
        """``x`` is ``[B,channels,H,W]`` with H and W multiples of ``multiple`` (``why`` explains it)."""
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must have shape [B,{channels},H,W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        if h % multiple or w % multiple:
            reason = f" ({why})" if why else ""
            raise ValueError(f"{what}: height and width must be divisible by {multiple} for this model{reason}, "
                             f"got {h}×{w}")

    def _window_multiples(self) -> list[tuple[int, str]]:
        """``(multiple, why)`` pairs a window's height and width must meet, checked in order by :meth:`_check_windows`."""
        return []

    def _check_windows(self, x: torch.Tensor, what: str, channels: int = 1) -> None:
        """``x`` is ``[B,channels,H,W]`` with H and W multiples of each of :meth:`_window_multiples`."""
        for multiple, why in self._window_multiples() or [(1, "")]:
            self._check_window_shape(x, what, multiple, why, channels)

    def _check_batch(self, images: torch.Tensor, masks: torch.Tensor, organ_ids: torch.Tensor) -> torch.Tensor:
        """A training batch's windows checked; its organ ids as a long tensor on the images' device."""
        self._check_windows(images, "images", self.image_channels)
        self._check_windows(masks, "masks")
        self._check_pair(images, masks)
        return self._check_organs(organ_ids, images.shape[0]).to(images.device)

    def _check_pair(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        """Training images and masks: as many, of the same height and width (the channels may differ)."""
        if images.shape[-2:] != masks.shape[-2:] or images.shape[0] != masks.shape[0]:
            raise ValueError(f"images {list(images.shape)} and masks {list(masks.shape)} differ in shape")

    def _check_latent_condition(self, cond: torch.Tensor, channels: int) -> tuple[int, int, int]:
        """``(B, h, w)`` of a condition that is one latent ``[B,channels,h,w]`` (what :meth:`condition` returns)."""
        if not isinstance(cond, torch.Tensor) or cond.ndim != 4 or cond.shape[1] != channels:
            got = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must have shape [B,{channels},h,w] (from condition()), got {got}")
        b, _, h, w = cond.shape
        return b, h, w

    # -- the reverse process shared by the methods ------------------------------------------
    @staticmethod
    def _per_sample(num_samples: int, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each row's tensors repeated for its ``N`` chains, batched together: row i, sample n sits at i*N + n."""
        return tuple(x.repeat_interleave(num_samples, dim=0) for x in rows)

    def _starting_noise(self, rows: int, num_samples: int, channels: int, size: tuple[int, int],
                        generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``x_T`` of the ``rows × N`` chains: standard normal ``[rows·N, channels, h, w]``, all drawn at once."""
        return randn((rows * num_samples, channels, *size), generator, device, dtype)

    def _last_timestep(self, x: torch.Tensor) -> torch.Tensor:
        """The last training timestep (pure noise), one per row of ``x``."""
        return torch.full((x.shape[0],), self.config["num_train_timesteps"] - 1, device=x.device, dtype=torch.long)

    def predicted_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The x0 estimate implied by the denoiser's ``prediction`` at ``x_t`` (``alpha_bar`` per row): Tweedie's
        formula ``(x_t − sqrt(1−ᾱ)·ε̂)/sqrt(ᾱ)`` for ε-prediction, the prediction itself for x0-prediction."""
        if self.prediction_type == "sample":
            return prediction
        return eps_to_x0(x_t, prediction, alpha_bar)

    def _single_step(self, predict, x_T: torch.Tensor, clip: float) -> torch.Tensor:
        """One reverse step from pure noise at the last training timestep straight to x0 (in ``[-clip, clip]``)."""
        t = self._last_timestep(x_T)
        pred = predict(x_T, t).to(torch.float32)
        x0 = self.predicted_x0(x_T.to(torch.float32), pred, self._alpha_bar(t, x_T.device))
        return x0.clamp(-clip, clip).to(x_T.dtype)

    def _denoise(self, predict, x_T: torch.Tensor, steps: int, scheduler: str, generator: torch.Generator | None,
                 clip: float, single_step: bool = True) -> torch.Tensor:
        """x0 from the starting noise ``x_T``: ``predict(x_t, t)`` gives the denoiser's :attr:`prediction_type`.

        ``steps == 1`` takes :meth:`_single_step` (unless ``single_step=False``: then the scheduler's own
        one-step loop); otherwise ``steps`` steps of a fresh ``scheduler`` (:func:`~MedDiffSegLib.sampling.run_reverse`).
        """
        if steps == 1 and single_step:
            return self._single_step(predict, x_T, clip)
        return run_reverse(predict, x_T, scheduler, steps, generator, prediction_type=self.prediction_type, clip=clip,
                           **self._schedule())

    # -- the training draw shared by the methods --------------------------------------------
    def _noised(self, x0: torch.Tensor, generator: torch.Generator | None):
        """``(t, noise, ᾱ_t, x_t)`` for a training batch ``x0``: a timestep per row, then the noise (in that order)."""
        t = randint(self.config["num_train_timesteps"], (x0.shape[0],), generator, x0.device)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        alpha_bar = self._alpha_bar(t, x0.device)
        return t, noise, alpha_bar, add_noise(x0, noise, alpha_bar)


def _list_element(default: list | tuple) -> Any:
    """The element type a list-valued config key holds: bool if every default is, else float if any is, else int."""
    if default and all(isinstance(v, bool) for v in default):
        return False
    return 0.0 if any(isinstance(v, float) for v in default) else 0


def _coerce(method: str, key: str, value: Any, like: Any) -> Any:
    """``value`` as the type of ``like`` (bool, int, float or str), or a :class:`ModelError` naming the key."""
    if isinstance(like, bool):
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ModelError(f"{method} config: {key} must be true or false, got {value!r}")
    if isinstance(like, int):
        if (isinstance(value, bool) or not isinstance(value, (int, float, str))
                or (isinstance(value, float) and not value.is_integer())):
            raise ModelError(f"{method} config: {key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ModelError(f"{method} config: {key} must be an integer, got {value!r}") from None
    if isinstance(like, float):
        if isinstance(value, bool):
            raise ModelError(f"{method} config: {key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ModelError(f"{method} config: {key} must be a number, got {value!r}") from None
    if isinstance(like, str):
        if not isinstance(value, str):
            raise ModelError(f"{method} config: {key} must be a string, got {value!r}")
        return value
    return value
