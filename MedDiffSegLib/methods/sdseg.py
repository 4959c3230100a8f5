"""SDSeg — Stable Diffusion Segmentation with a single-step reverse process (MICCAI 2024).

Lin et al., "Stable Diffusion Segmentation for Biomedical Images with Single-step Reverse
Process". The segmentation mask lives in the latent space of a (frozen) mask autoencoder; a
trainable image encoder produces a latent of the same spatial size that is concatenated with
the noisy mask latent ("concat latent fusion"); the denoiser predicts the noise ``ε``. Besides
the usual noise MSE, a *latent-estimation* loss compares ``ẑ0 = (z_t − sqrt(1−ᾱ_t)·ε̂)/sqrt(ᾱ_t)``
with ``z0``, which trains the model so that one reverse step from pure noise already gives
the mask. Multi-step sampling with any scheduler remains available.

Our extension: an organ prompt (a class embedding in the denoiser); with ``num_organs=1`` this
is the paper's single-class model. The mask autoencoder here is a small binary-mask
autoencoder trained in a first stage instead of the paper's frozen Stable Diffusion VAE.

This module also holds :class:`LatentDiffusionSegmentation`, the latent-space machinery that
``sdseg`` and ``guided`` share (image encoder, mask autoencoder, denoiser, sampling); the two
methods differ in what the denoiser predicts and in the loss.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..networks import DOWNSAMPLE, ImageEncoder, LatentDenoiser, MaskAutoencoder
from ..networks.prompts import PromptEncoder
from ..sampling import (
    DEFAULT_BETA_END,
    DEFAULT_BETA_SCHEDULE,
    DEFAULT_BETA_START,
    DEFAULT_NUM_TRAIN_TIMESTEPS,
    add_noise,
    alphas_cumprod,
    eps_to_x0,
    randint,
    randn,
    run_reverse,
)
from ..errors import ModelError
from .base import Method, register_method

#: Latents of the mask autoencoder are tanh-bounded: x0 estimates are clipped to [-LATENT_RANGE, LATENT_RANGE].
LATENT_RANGE = 1.0


def _shared_default_config(num_organs: int) -> dict[str, Any]:
    """The real-size architecture (windows of 224×224 at 2 mm → latents of 28×28 → 14 → 7)."""
    return {
        "num_organs": int(num_organs),
        # image window channels: axial context slices (preprocessing.context_slices), 1 = 2D
        "image_channels": 1,
        # image encoder: widths at full, /2, /4, /8 resolution; residual blocks at /2, /4, /8
        "image_latent_channels": 32,
        "image_encoder_channels": [16, 32, 64, 128],
        "image_encoder_blocks": [0, 1, 1],
        # mask autoencoder (decoder widths at /8, /4, /2, full resolution)
        "mask_latent_channels": 4,
        "mask_encoder_channels": [8, 16, 32, 64],
        "mask_encoder_blocks": [0, 0, 1],
        "mask_decoder_channels": [64, 32, 16, 8],
        "mask_decoder_blocks": [1, 0, 0],
        "norm_groups": 8,
        # denoiser (MONAI DiffusionModelUNet on the latent grid)
        "unet_channels": [64, 128, 128],
        "unet_res_blocks": [1, 1, 1],
        "unet_attention_levels": [False, False, True],
        "unet_norm_groups": 32,
        "unet_head_channels": 32,
        # MONAI's zero init of the UNet's output and residual-branch layers (False: ordinary init)
        "unet_zero_init": True,
        # interactive prompts (clicks, box, previous mask; MedDiffSegLib.interactive.prompts): 0 = none,
        # 4 = the prompt channels, encoded and added to the image latent of each organ row
        "prompt_channels": 0,
        "prompt_encoder_channels": [16, 32, 64],
        # noise schedule (shared by training and every scheduler)
        "num_train_timesteps": DEFAULT_NUM_TRAIN_TIMESTEPS,
        "beta_schedule": DEFAULT_BETA_SCHEDULE,
        "beta_start": DEFAULT_BETA_START,
        "beta_end": DEFAULT_BETA_END,
    }


def _shared_tiny_config(num_organs: int) -> dict[str, Any]:
    """Milliseconds on a CPU: windows of 32×32 → latents of 4×4 → 2×2."""
    cfg = _shared_default_config(num_organs)
    cfg.update({
        "image_latent_channels": 4,
        "image_encoder_channels": [4, 8, 8, 16],
        "image_encoder_blocks": [0, 0, 1],
        "mask_latent_channels": 4,
        "mask_encoder_channels": [4, 8, 8, 16],
        "mask_encoder_blocks": [0, 0, 0],
        "mask_decoder_channels": [16, 8, 8, 4],
        "mask_decoder_blocks": [0, 0, 0],
        "norm_groups": 4,
        "unet_channels": [16, 16],
        "unet_res_blocks": [1, 1],
        "unet_attention_levels": [False, True],
        "unet_norm_groups": 8,
        "unet_head_channels": 8,
        "prompt_encoder_channels": [4, 8, 8],
        # random weights must still react to noise, timestep and organ prompt
        "unet_zero_init": False,
    })
    return cfg


class LatentDiffusionSegmentation(Method):
    """Latent diffusion over a binary-mask autoencoder's latent, conditioned on an image latent.

    Submodules: ``image_encoder`` (window → image latent, trained with the denoiser),
    ``mask_autoencoder`` (mask ↔ bounded latent, trained first, then frozen) and ``denoiser``
    (MONAI ``DiffusionModelUNet``; input = noisy mask latent ⊕ image latent, organ prompt as a
    class embedding). Subclasses set :attr:`prediction_type` and implement the denoiser loss.
    """

    stages: ClassVar[tuple[str, ...]] = ("autoencoder", "denoiser")
    #: What the denoiser predicts: "epsilon" (noise) or "sample" (z0).
    prediction_type: ClassVar[str] = "epsilon"

    def __init__(self, config: dict[str, Any]):
        super().__init__(self.normalise_config(config))
        c = self.config
        self.image_encoder = ImageEncoder(
            c["image_latent_channels"], c["image_encoder_channels"], c["image_encoder_blocks"], c["norm_groups"],
            in_channels=c["image_channels"],
        )
        self.mask_autoencoder = MaskAutoencoder(
            c["mask_latent_channels"], c["mask_encoder_channels"], c["mask_encoder_blocks"],
            c["mask_decoder_channels"], c["mask_decoder_blocks"], c["norm_groups"],
        )
        self.denoiser = LatentDenoiser(
            c["mask_latent_channels"], c["image_latent_channels"], c["num_organs"], c["unet_channels"],
            c["unet_res_blocks"], c["unet_attention_levels"], c["unet_norm_groups"], c["unet_head_channels"],
            c["unet_zero_init"],
        )
        # Interactive prompts: encoded on their own and added to the image latent (zero in, zero out).
        self.prompt_encoder = (PromptEncoder(c["prompt_channels"], c["image_latent_channels"], c["prompt_encoder_channels"])
                               if c["prompt_channels"] > 0 else None)
        # ᾱ_t from the same diffusers code the schedulers use; a plain attribute (not a buffer) so
        # that it stays float64 whatever dtype the module is cast to, and stays out of state_dict.
        self._alphas_cumprod = alphas_cumprod(**self._schedule()).to(torch.float64)

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def default_config(cls, num_organs: int) -> dict[str, Any]:
        """A real configuration (random init) for training the shipped model on a CPU."""
        cfg = _shared_default_config(num_organs)
        cfg.update(cls._method_defaults())
        return cfg

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        cfg = _shared_tiny_config(num_organs)
        cfg.update(cls._method_defaults())
        return cfg

    @classmethod
    def _method_defaults(cls) -> dict[str, Any]:
        """Method-specific hyperparameters (with their defaults)."""
        return {}

    # -- geometry ------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Window height and width must be multiples of this (8 × the UNet's downsampling)."""
        return DOWNSAMPLE * self.denoiser.size_multiple

    def _check_windows(self, x: torch.Tensor, what: str, channels: int = 1) -> None:
        self._check_window_shape(x, what, DOWNSAMPLE, f"{DOWNSAMPLE}× autoencoder", channels)
        self._check_window_shape(x, what, self.size_multiple,
                                 f"{DOWNSAMPLE}× autoencoder, {self.denoiser.size_multiple}× UNet", channels)

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        self._check_windows(images, "images", self.image_channels)
        return self.image_encoder(images)

    def _with_prompts(self, image_latent: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """The image latent of each row plus its encoded prompts (unchanged without prompts)."""
        if prompts is None:
            return image_latent
        b, _, h, w = image_latent.shape
        self._check_prompts(prompts, b, h * DOWNSAMPLE, w * DOWNSAMPLE)
        return image_latent + self.prompt_encoder(prompts.to(image_latent.dtype))

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        organ_ids: torch.Tensor,
        num_samples: int,
        steps: int,
        generator: torch.Generator | None,
        scheduler: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_samples, steps, scheduler = self._check_sampling(num_samples, steps, scheduler)
        if cond.ndim != 4 or cond.shape[1] != self.config["image_latent_channels"]:
            raise ValueError(
                f"cond must have shape [B,{self.config['image_latent_channels']},h,w] (from condition()), got {list(cond.shape)}"
            )
        b, _, h, w = cond.shape
        organs = self._check_organs(organ_ids, b).to(cond.device)
        cond = self._with_prompts(cond, prompts)
        # N chains per row, batched together: row i, sample n sits at i*N + n.
        cond_n = cond.repeat_interleave(num_samples, dim=0)
        organs_n = organs.repeat_interleave(num_samples, dim=0)
        z_T = randn((b * num_samples, self.config["mask_latent_channels"], h, w), generator, cond.device, cond.dtype)
        if steps == 1:
            z0 = self._single_step(z_T, cond_n, organs_n)
        else:
            z0 = run_reverse(
                lambda z, t: self.denoiser(z, t, cond_n, organs_n),
                z_T, scheduler, steps, generator,
                prediction_type=self.prediction_type, clip=LATENT_RANGE, **self._schedule(),
            )
        logits = self.mask_autoencoder.decode(z0)
        return torch.sigmoid(logits.to(torch.float32)).view(b, num_samples, h * DOWNSAMPLE, w * DOWNSAMPLE)

    def _single_step(self, z_T: torch.Tensor, cond: torch.Tensor, organs: torch.Tensor) -> torch.Tensor:
        """One reverse step from pure noise at the last training timestep, straight to z0."""
        t = torch.full((z_T.shape[0],), self.config["num_train_timesteps"] - 1, device=z_T.device, dtype=torch.long)
        pred = self.denoiser(z_T, t, cond, organs).to(torch.float32)
        z0 = self.predicted_x0(z_T.to(torch.float32), pred, self._alpha_bar(t, z_T.device))
        return z0.clamp(-LATENT_RANGE, LATENT_RANGE).to(z_T.dtype)

    @abc.abstractmethod
    def predicted_x0(self, z_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The z0 estimate implied by the denoiser's ``prediction`` at ``z_t`` (``alpha_bar`` per row)."""

    # -- starting from another model -------------------------------------------------------
    def load_pretrained(self, path, organs: list[str] | None = None) -> dict[str, Any]:
        """Fine-tune from a trained package of this method (a training config's ``init_from``).

        Every tensor is taken from the package, with two adaptations so that a model can start
        from one trained for other organs or without slice context:

        - organ prompts (the class embedding rows) are matched **by organ name** (``organs``:
          this model's organ names in order); an organ the package does not know keeps its
          fresh initialisation;
        - a package whose image encoder reads one slice starts a model with ``C`` context
          slices by putting its first-convolution weights on the centre slice and zeros on the
          others, so the model starts exactly as the 2D one and learns to use the neighbours.

        Any other difference in shape is an error. Returns a JSON-plain description for the
        provenance.
        """
        from ..registry.package import sha256_file

        p, state, pkg = self._pretrained_package_state(path)
        theirs_organs = pkg.organ_names if pkg is not None else None
        mine = self.state_dict()
        # A package without prompts starts a model with them: the (zero-initialised) prompt encoder
        # keeps its initialisation, so the model starts exactly as the automatic one.
        missing = [k for k in mine if k not in state and not k.startswith("prompt_encoder.")]
        if missing:
            raise ModelError(f"pretrained weights {p} do not fit this model ({len(missing)} tensors missing, e.g. "
                             f"{missing[:3]}); use the same architecture")
        embed_key = "denoiser.unet.class_embedding.weight"
        stem_key = "image_encoder.stem.0.weight"
        matched: list[str] = []
        with torch.no_grad():
            for k, v in mine.items():
                if k not in state:  # the prompt encoder of a model that gains prompts
                    continue
                src = state[k]
                if k == embed_key and (src.shape != v.shape or (organs and theirs_organs)):
                    if not (organs and theirs_organs) or src.shape[1:] != v.shape[1:]:
                        raise ModelError(f"pretrained weights {p}: organ prompts of shape {list(src.shape)} do not "
                                         f"fit {list(v.shape)} and cannot be matched by organ name")
                    for i, name in enumerate(organs):
                        if name in theirs_organs:
                            v[i].copy_(src[theirs_organs.index(name)])
                            matched.append(name)
                elif k == stem_key and src.shape != v.shape:
                    if src.shape[1] != 1 or src.shape[0] != v.shape[0] or src.shape[2:] != v.shape[2:]:
                        raise ModelError(f"pretrained weights {p}: image encoder input {list(src.shape)} does not "
                                         f"fit {list(v.shape)}")
                    v.zero_()
                    v[:, v.shape[1] // 2].copy_(src[:, 0])
                elif src.shape != v.shape:
                    raise ModelError(f"pretrained weights {p}: {k} has shape {list(src.shape)}, this model "
                                     f"{list(v.shape)}; use the same architecture")
                else:
                    v.copy_(src.to(v.dtype))
        info: dict[str, Any] = {"path": str(p.resolve()), "sha256": sha256_file(p), "tensors": len(mine)}
        if pkg is not None:
            info.update({"package": pkg.name, "version": pkg.version, "organs_matched": matched,
                         "organs_new": [o for o in (organs or []) if o not in matched]})
        return info

    # -- training ------------------------------------------------------------------------
    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        if stage == "autoencoder":
            return list(self.mask_autoencoder.parameters())
        if stage == "denoiser":
            extra = list(self.prompt_encoder.parameters()) if self.prompt_encoder is not None else []
            return list(self.image_encoder.parameters()) + list(self.denoiser.parameters()) + extra
        raise ValueError(f"unknown stage {stage!r}; {self.name} trains in stages: {', '.join(self.stages)}")

    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        organ_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        stage: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        stage = self._check_stage(stage)
        self._check_windows(masks, "masks")
        if stage == "autoencoder":
            return self.mask_autoencoder.loss(masks)
        self._check_windows(images, "images", self.image_channels)
        if images.shape[-2:] != masks.shape[-2:] or images.shape[0] != masks.shape[0]:
            raise ValueError(f"images {list(images.shape)} and masks {list(masks.shape)} differ in shape")
        b = images.shape[0]
        organs = self._check_organs(organ_ids, b).to(images.device)
        with torch.no_grad():  # the mask autoencoder is frozen in this stage: it only supplies z0
            z0 = self.mask_autoencoder.encode(masks).to(torch.float32)
        image_latent = self._with_prompts(self.image_encoder(images), prompts)
        t = randint(self.config["num_train_timesteps"], (b,), generator, images.device)
        noise = randn(z0.shape, generator, z0.device, z0.dtype)
        alpha_bar = self._alpha_bar(t, z0.device)
        z_t = add_noise(z0, noise, alpha_bar)
        pred = self.denoiser(z_t.to(image_latent.dtype), t, image_latent, organs).to(torch.float32)
        return self.denoiser_loss(z0, z_t, noise, pred, alpha_bar)

    @abc.abstractmethod
    def denoiser_loss(
        self, z0: torch.Tensor, z_t: torch.Tensor, noise: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of the denoiser stage; ``"loss"`` is the total."""


@register_method
class SDSeg(LatentDiffusionSegmentation):
    """SDSeg: ε-prediction with a latent-estimation loss, so one reverse step gives the mask.

    Method-specific config: ``latent_loss_weight`` (λ in ``loss = MSE(ε̂, ε) + λ·MSE(ẑ0, z0)``).
    """

    name = "sdseg"
    prediction_type = "epsilon"

    @classmethod
    def _method_defaults(cls) -> dict[str, Any]:
        return {"latent_loss_weight": 1.0}

    def predicted_x0(self, z_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        return eps_to_x0(z_t, prediction, alpha_bar)

    def denoiser_loss(self, z0, z_t, noise, prediction, alpha_bar):
        noise_mse = F.mse_loss(prediction, noise)
        z0_hat = eps_to_x0(z_t, prediction, alpha_bar)  # latent estimation from the predicted noise
        latent_mse = F.mse_loss(z0_hat, z0)
        loss = noise_mse + self.config["latent_loss_weight"] * latent_mse
        return {"loss": loss, "noise_mse": noise_mse, "latent_mse": latent_mse}
