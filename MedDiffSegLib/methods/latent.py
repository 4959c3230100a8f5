"""The methods that diffuse the latent of a binary-mask autoencoder: ``sdseg``, ``guided``, ``meddelinea``.

:class:`LatentMaskMethod` holds what they share on top of the Method seam: the mask autoencoder
(``self.mask_autoencoder``, 8× smaller, tanh-bounded latent), a denoiser called as
``self.denoiser(z_t, t, cond, organs)`` on the mask latent beside an image latent ``cond`` of
``image_latent_channels``, sampling (per-sample condition, starting noise, the one-step path or a
scheduler's loop, decoding to probabilities), the training draw on ``z0 = encode(mask)``, and the
config blocks of the image encoder and the mask autoencoder. The subclasses build the networks
and say what the denoiser predicts and how it is trained.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError
from ..networks import DOWNSAMPLE
from .base import Method

#: The mask latents are tanh-bounded: x0 estimates are clipped to [-LATENT_RANGE, LATENT_RANGE] when sampling.
LATENT_RANGE = 1.0


def image_encoder_config(latent_channels: int, tiny: bool = False) -> dict[str, Any]:
    """Config keys of the image encoder: widths at full, /2, /4, /8 resolution; residual blocks at /2, /4, /8."""
    return {
        "image_latent_channels": int(latent_channels),
        "image_encoder_channels": [4, 8, 8, 16] if tiny else [16, 32, 64, 128],
        "image_encoder_blocks": [0, 0, 1] if tiny else [0, 1, 1],
    }


def mask_autoencoder_config(tiny: bool = False) -> dict[str, Any]:
    """Config keys of the binary-mask autoencoder (decoder widths at /8, /4, /2, full resolution) and of the
    GroupNorm groups of both autoencoders."""
    return {
        "mask_latent_channels": 4,
        "mask_encoder_channels": [4, 8, 8, 16] if tiny else [8, 16, 32, 64],
        "mask_encoder_blocks": [0, 0, 0] if tiny else [0, 0, 1],
        "mask_decoder_channels": [16, 8, 8, 4] if tiny else [64, 32, 16, 8],
        "mask_decoder_blocks": [0, 0, 0] if tiny else [1, 0, 0],
        "norm_groups": 4 if tiny else 8,
    }


class LatentMaskMethod(Method):
    """Diffusion over a mask autoencoder's latent, conditioned on an image latent (see the module docstring).

    Subclasses set ``mask_autoencoder``, ``denoiser`` (and ``prompt_encoder`` when their config has
    ``prompt_channels``) and :attr:`latent_multiple`, the factor the latent's height and width must
    be a multiple of for the denoiser.
    """

    #: True once the mask autoencoder comes from another model (:meth:`load_mask_autoencoder`): the
    #: autoencoder stage then leaves it out (``stage_parameters``, and its loss term where the stage
    #: trains other networks too).
    mask_autoencoder_fixed: bool = False

    # -- a shared mask autoencoder -----------------------------------------------------------
    def load_mask_autoencoder(self, path, version: str | None = None) -> dict[str, Any]:
        """Take the mask autoencoder of another trained model, of any latent method, and keep it fixed.

        The methods that diffuse a mask latent can share one autoencoder, so that a comparison
        between them compares denoisers and not autoencoders (issue #24: "the autoencoder choices
        of the accuracy issue"). ``path`` is a package folder (checked against its sha256), an
        installed package's name, or a ``weights.safetensors``; ``version`` (optional) must then
        be the package's. Every ``mask_autoencoder.*`` tensor must exist with this model's shape.
        Returns a JSON-plain description for the provenance.
        """
        from ..registry.package import sha256_file

        p, state, pkg = self._pretrained_package_state(path, same_method=False)
        if version is not None and (pkg is None or pkg.version != str(version)):
            found = "a weights file without a version" if pkg is None else f"version {pkg.version}"
            raise ModelError(f"mask autoencoder from {path}: version {version} was asked for, found {found}")
        n = self._copy_pretrained(state, ("mask_autoencoder.",), p, "the mask autoencoder weights in",
                                  "use the same mask_* configuration")
        self.mask_autoencoder_fixed = True
        info: dict[str, Any] = {"path": str(p.resolve()), "sha256": sha256_file(p), "tensors": n}
        if pkg is not None:
            info.update({"package": pkg.name, "version": pkg.version, "method": pkg.method_name})
        return info

    def _mask_autoencoder_parameters(self) -> list[torch.nn.Parameter]:
        """The mask autoencoder's parameters for the autoencoder stage (none once it is fixed)."""
        return [] if self.mask_autoencoder_fixed else list(self.mask_autoencoder.parameters())

    # -- geometry ------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> tuple[int, str]:
        """``(factor, why)``: the latent's height and width must be multiples of ``factor`` for the denoiser."""
        raise NotImplementedError

    @property
    def size_multiple(self) -> int:
        """Window height and width must be multiples of this (8 × the denoiser's factor)."""
        return DOWNSAMPLE * self.latent_multiple[0]

    def _window_multiples(self) -> list[tuple[int, str]]:
        factor, why = self.latent_multiple
        return [(DOWNSAMPLE, f"{DOWNSAMPLE}× autoencoder"), (self.size_multiple, f"{DOWNSAMPLE}× autoencoder, {why}")]

    # -- inference -----------------------------------------------------------------------
    def _with_prompts(self, image_latent: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """The image latent of each row plus its encoded prompts (unchanged without prompts)."""
        if prompts is None:
            return image_latent
        b, _, h, w = image_latent.shape
        self._check_prompts(prompts, b, h * DOWNSAMPLE, w * DOWNSAMPLE)
        return image_latent + self.prompt_encoder(prompts.to(image_latent.dtype))

    def _sample(self, cond, organ_ids, num_samples, steps, generator, scheduler, prompts=None) -> torch.Tensor:
        b, h, w = self._check_latent_condition(cond, self.config["image_latent_channels"])
        factor = self.latent_multiple[0]
        if h % factor or w % factor:
            raise ValueError(f"cond: latent {h}×{w} is not divisible by {factor} ({self.latent_multiple[1]})")
        organs = self._check_organs(organ_ids, b).to(cond.device)
        cond = self._with_prompts(cond, prompts)
        cond_n, organs_n = self._per_sample(num_samples, cond, organs)
        z_T = self._starting_noise(b, num_samples, self.config["mask_latent_channels"], (h, w), generator,
                                   cond.device, cond.dtype)
        z0 = self._denoise(lambda z, t: self.denoiser(z, t, cond_n, organs_n), z_T, steps, scheduler, generator,
                           LATENT_RANGE)
        logits = self.mask_autoencoder.decode(z0)
        return torch.sigmoid(logits.to(torch.float32)).view(b, num_samples, h * DOWNSAMPLE, w * DOWNSAMPLE)

    # -- training ------------------------------------------------------------------------
    def _noised_mask_latent(self, masks: torch.Tensor, generator: torch.Generator | None):
        """``(z0, t, noise, ᾱ_t, z_t)``: the frozen mask autoencoder's latent of ``masks``, noised at a random timestep."""
        with torch.no_grad():  # the mask autoencoder is frozen in the denoiser stage: it only supplies z0
            z0 = self.mask_autoencoder.encode(masks).to(torch.float32)
        return (z0, *self._noised(z0, generator))
