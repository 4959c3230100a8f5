"""SDSeg — Stable Diffusion Segmentation with a single-step reverse process (MICCAI 2024).

Lin et al., "Stable Diffusion Segmentation for Biomedical Images with Single-step Reverse
Process". The segmentation mask lives in the latent space of a (frozen) mask autoencoder; a
trainable image encoder produces a latent of the same spatial size that is concatenated with
the noisy mask latent ("concat latent fusion"); the denoiser predicts the noise ``ε``. Besides
the usual noise MSE, a *latent-estimation* loss compares ``ẑ0 = (z_t − sqrt(1−ᾱ_t)·ε̂)/sqrt(ᾱ_t)``
with ``z0``, which trains the model so that one reverse step from pure noise already gives
the mask. Both terms are mean absolute errors with λ = 1, as in the paper's training
(``loss_type: "l2"`` gives the squared-error variant). Multi-step sampling with any scheduler
remains available.

Our extension: an organ prompt (a class embedding in the denoiser); with ``num_organs=1`` this
is the paper's single-class model. The mask autoencoder here is a small binary-mask
autoencoder trained in a first stage instead of the paper's frozen Stable Diffusion VAE.

This module also holds :class:`LatentDiffusionSegmentation`, the networks that ``sdseg`` and
``guided`` share (image encoder, mask autoencoder, UNet denoiser, prompt encoder); the two methods
differ in what the denoiser predicts and in the loss. Sampling in the mask latent is
:class:`~MedDiffSegLib.methods.latent.LatentMaskMethod`'s, shared with ``meddelinea``.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..networks import ImageEncoder, LatentDenoiser, MaskAutoencoder
from ..networks.prompts import PromptEncoder
from ..sampling import eps_to_x0
from .base import LATENT_SCHEDULE, register_method
from .latent import LATENT_RANGE, LatentMaskMethod, image_encoder_config, mask_autoencoder_config

__all__ = ["LATENT_RANGE", "LatentDiffusionSegmentation", "SDSeg", "weighted_mean"]


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``values`` ``[B,C,h,w]``; with ``weights`` ``[B,1,h,w]`` the weighted mean
    ``Σ w·v / Σ w`` over every element (the weights broadcast over the channels), so the loss keeps its scale."""
    if weights is None:
        return values.mean()
    w = weights.to(values.dtype).expand_as(values)
    return (w * values).sum() / w.sum()


def _shared_default_config(num_organs: int, tiny: bool = False) -> dict[str, Any]:
    """The real-size architecture (windows of 224×224 at 2 mm → latents of 28×28 → 14 → 7), or with ``tiny``
    one that takes milliseconds on a CPU (windows of 32×32 → latents of 4×4 → 2×2)."""
    cfg = {
        "num_organs": int(num_organs),
        # image window channels: axial context slices (preprocessing.context_slices), 1 = 2D
        "image_channels": 1,
        **image_encoder_config(4 if tiny else 32, tiny),
        **mask_autoencoder_config(tiny),
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
        **LATENT_SCHEDULE,
    }
    if not tiny:
        return cfg
    cfg.update({
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


class LatentDiffusionSegmentation(LatentMaskMethod):
    """Latent diffusion over a binary-mask autoencoder's latent, conditioned on an image latent.

    Submodules: ``image_encoder`` (window → image latent, trained with the denoiser),
    ``mask_autoencoder`` (mask ↔ bounded latent, trained first, then frozen) and ``denoiser``
    (MONAI ``DiffusionModelUNet``; input = noisy mask latent ⊕ image latent, organ prompt as a
    class embedding). Subclasses set :attr:`prediction_type` and implement the denoiser loss.
    """

    stages: ClassVar[tuple[str, ...]] = ("autoencoder", "denoiser")

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

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def default_config(cls, num_organs: int) -> dict[str, Any]:
        """A real configuration (random init) for training the shipped model on a CPU."""
        cfg = _shared_default_config(num_organs)
        cfg.update(cls._method_defaults())
        return cfg

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        cfg = _shared_default_config(num_organs, tiny=True)
        cfg.update(cls._method_defaults())
        return cfg

    @classmethod
    def _method_defaults(cls) -> dict[str, Any]:
        """Method-specific hyperparameters (with their defaults)."""
        return {}

    # -- geometry ------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> tuple[int, str]:
        return self.denoiser.size_multiple, f"{self.denoiser.size_multiple}× UNet"

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        self._check_windows(images, "images", self.image_channels)
        return self.image_encoder(images)

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
        if self._check_stage(stage) == "autoencoder":
            return self._mask_autoencoder_parameters()
        extra = list(self.prompt_encoder.parameters()) if self.prompt_encoder is not None else []
        return list(self.image_encoder.parameters()) + list(self.denoiser.parameters()) + extra

    def _stage_loss(self, stage, images, masks, organ_ids, generator, prompts=None,
                    weights=None) -> dict[str, torch.Tensor]:
        self._check_windows(masks, "masks")
        if stage == "autoencoder":
            return self.mask_autoencoder.loss(masks)
        organs = self._check_batch(images, masks, organ_ids)
        z0, t, noise, alpha_bar, z_t = self._noised_mask_latent(masks, generator)
        if weights is not None and (weights.shape[0] != z0.shape[0] or weights.shape[2:] != z0.shape[2:]):
            raise ValueError(f"weights: expected [{z0.shape[0]}, 1, {z0.shape[2]}, {z0.shape[3]}] (the latent grid), "
                             f"got {list(weights.shape)}")
        image_latent = self._with_prompts(self.image_encoder(images), prompts)
        pred = self.denoiser(z_t.to(image_latent.dtype), t, image_latent, organs).to(torch.float32)
        return self.denoiser_loss(z0, z_t, noise, pred, alpha_bar, weights)

    @abc.abstractmethod
    def denoiser_loss(
        self, z0: torch.Tensor, z_t: torch.Tensor, noise: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of the denoiser stage; ``"loss"`` is the total. ``weights`` ``[B,1,h,w]`` (optional) weigh
        the latent pixels (:func:`weighted_mean`)."""


@register_method
class SDSeg(LatentDiffusionSegmentation):
    """SDSeg: ε-prediction with a latent-estimation loss, so one reverse step gives the mask.

    Method-specific config: ``latent_loss_weight`` (λ in ``loss = |ε̂ − ε| + λ·|ẑ0 − z0|``, both means over
    the latent) and ``loss_type`` (``"l1"``, the paper's mean absolute error, or ``"l2"``, squared error).
    """

    name = "sdseg"
    summary = "SDSeg: latent diffusion, one reverse step (latent estimation)"
    prediction_type = "epsilon"

    @classmethod
    def _method_defaults(cls) -> dict[str, Any]:
        return {"latent_loss_weight": 1.0, "loss_type": "l1"}

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        if cfg["loss_type"] not in ("l1", "l2"):
            raise ModelError(f"sdseg config: loss_type must be 'l1' or 'l2', got {cfg['loss_type']!r}")

    def denoiser_loss(self, z0, z_t, noise, prediction, alpha_bar, weights=None):
        l1 = self.config["loss_type"] == "l1"
        kind = "mae" if l1 else "mse"

        def distance(a, b):
            d = (a - b).abs() if l1 else (a - b).square()
            return weighted_mean(d, weights)

        noise_term = distance(prediction, noise)
        z0_hat = eps_to_x0(z_t, prediction, alpha_bar)  # latent estimation from the predicted noise
        latent_term = distance(z0_hat, z0)
        loss = noise_term + self.config["latent_loss_weight"] * latent_term
        return {"loss": loss, f"noise_{kind}": noise_term, f"latent_{kind}": latent_term}
