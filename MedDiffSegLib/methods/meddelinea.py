"""MedDelinea — a Control DiT beside a DiT noise predictor in latent space (MIDL 2025).

"Scalable and Efficient Medical Image Segmentation via Controllable Diffusion Transformers".
Built from the paper's description (the authors' public code does not implement it).

Pipeline
--------
- **Latents.** The image window and the mask are encoded by autoencoders that are frozen
  while the denoiser trains: ``Z_o = image_autoencoder.encode(image)`` and
  ``Z_m = mask_autoencoder.encode(mask)`` (both ×8 smaller, tanh-bounded).
- **Denoiser** (:class:`~MedDiffSegLib.networks.dit.ControlledDiT`). ``Z_m`` is noised to
  ``Z_mt``. A DiT of ``dit_depth`` (N) blocks sees ``Z_mt``; a Control DiT of
  ``control_depth`` (K ≤ N) blocks sees ``Z_mt ⊕ zero_conv(Z_o)``, and the output of its
  block k, through a zero-initialised linear projection, is added to the residual stream after
  DiT block k. Both transformers patchify the latent into tokens and modulate every block with
  adaLN from the timestep embedding plus an organ class-label embedding, so one model serves
  every organ of the package. At initialisation the control branch adds exact zeros.
- **Loss.** The DiT predicts the noise ``ε̂``; Tweedie's formula gives
  ``Ẑ0 = (Z_mt − sqrt(1−ᾱ_t)·ε̂) / sqrt(ᾱ_t)``, the mask decoder turns it into logits, and
  ``loss = MSE(ε̂, ε) + BCE + Dice`` (weights ``noise_loss_weight``, ``bce_weight``,
  ``dice_weight``). The decoded-mask terms train ``Ẑ0`` at every timestep, which is what makes
  the one-step estimate usable.
- **Sampling.** Euler ancestral by default (the paper's best); DDIM, DPM-Solver++, UniPC, LMS
  and DDPM selectable; ``steps=1`` is the one-step Tweedie estimate from pure noise at the last
  training timestep. A fresh scheduler per call (:func:`~MedDiffSegLib.sampling.run_reverse`).

Decisions where the paper leaves room or relies on pretrained parts
-------------------------------------------------------------------
- The paper uses a frozen pretrained VAE for image and mask. Here both autoencoders are
  trained in a first stage (``stages = ("autoencoder", "denoiser")``): the binary-mask
  autoencoder of :mod:`MedDiffSegLib.networks` (BCE + Dice) and an image autoencoder made of the
  library's :class:`~MedDiffSegLib.networks.ImageEncoder` (tanh latent) and a small
  convolutional reconstruction decoder (L1). The image decoder only serves this stage.
- In the denoiser stage the autoencoders are frozen except the mask decoder's last layer (its
  output convolution), which keeps training on the decoded-mask loss, as in the paper.
  ``freeze_image_encoder=False`` trains the image encoder with the denoiser (an ablation; the
  paper keeps it frozen).
- ``freeze_dit=True`` keeps the DiT out of the denoiser stage (the paper freezes a pretrained
  DiT); by default it is trained with the Control DiT, since no pretrained mask-latent DiT
  exists here. A frozen DiT only makes sense with weights that were trained before:
  :meth:`MedDelinea.load_pretrained` (a training config's ``init_from``) takes the
  autoencoders and the DiT of a trained ``meddelinea`` package and leaves the Control DiT at
  its zero initialisation; with the autoencoder stage at 0 steps that is the paper's recipe.
- The Control DiT has its own timestep and organ embeddings, so organ prompts stay learnable
  when the DiT is frozen. Its blocks have the DiT's width and head count.
- ``adaln_zero`` (default True) is DiT's adaLN-Zero initialisation; tiny test configs switch it
  off so that random models react to their inputs. The control path's zero convolution and
  zero projections are zero-initialised whatever this flag says.

The paper's ablation shape (a DiT-XL/2-sized DiT with K=15 control blocks) is
``{**default_config(n), **PAPER_SHAPE}``; :meth:`MedDelinea.default_config` is a small
transformer that trains on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..networks import ImageEncoder, MaskAutoencoder, MaskDecoder, soft_dice_loss
from ..networks.dit import ControlledDiT
from .base import LATENT_SCHEDULE, register_method
from .latent import LATENT_RANGE, LatentMaskMethod, image_encoder_config, mask_autoencoder_config

__all__ = ["LATENT_RANGE", "PAPER_SHAPE", "ImageAutoencoder", "MedDelinea"]

#: The paper's ablation shape with K=15 control blocks beside a DiT-XL/2-sized DiT.
PAPER_SHAPE: dict[str, Any] = {"dit_width": 1152, "dit_heads": 16, "dit_depth": 28, "control_depth": 15,
                               "patch_size": 2, "mlp_ratio": 4.0}


def _default_config(num_organs: int, tiny: bool = False) -> dict[str, Any]:
    """Windows of 224×224 at 2 mm → latents of 28×28 → 14×14 = 196 tokens (patch 2); with ``tiny``
    milliseconds on a CPU: windows of 32×32 → latents of 4×4 → 2×2 tokens."""
    cfg = {
        "num_organs": int(num_organs),
        # image autoencoder: ImageEncoder (widths at full, /2, /4, /8) + reconstruction decoder (/8 … full)
        **image_encoder_config(4 if tiny else 8, tiny),
        "image_decoder_channels": [16, 8, 8, 4] if tiny else [64, 32, 16, 8],
        "image_decoder_blocks": [0, 0, 0] if tiny else [1, 0, 0],
        # binary-mask autoencoder
        **mask_autoencoder_config(tiny),
        # DiT (N blocks) and Control DiT (K blocks), tokens of patch_size × patch_size latent pixels
        "patch_size": 2,
        "dit_width": 192,
        "dit_heads": 6,
        "dit_depth": 6,
        "control_depth": 3,
        "mlp_ratio": 4.0,
        "adaln_zero": True,
        "freeze_dit": False,
        "freeze_image_encoder": True,
        # loss weights
        "noise_loss_weight": 1.0,
        "bce_weight": 1.0,
        "dice_weight": 1.0,
        "image_loss_weight": 1.0,
        # noise schedule (shared by training and every scheduler)
        **LATENT_SCHEDULE,
    }
    if not tiny:
        return cfg
    cfg.update({
        "dit_width": 32,
        "dit_heads": 2,
        "dit_depth": 3,
        "control_depth": 2,
        "mlp_ratio": 2.0,
        # random weights must still react to noise, timestep and organ prompt
        "adaln_zero": False,
    })
    return cfg


class ImageAutoencoder(nn.Module):
    """Image window ``[B,1,H,W]`` in [-1, 1] ↔ bounded latent ``[B,C,H/8,W/8]`` (tanh).

    The encoder is the library's :class:`ImageEncoder`; the decoder is a
    :class:`MaskDecoder`-shaped convolutional decoder whose single output channel is the
    reconstructed window (trained with L1). Only the encoder is used at inference.
    """

    def __init__(
        self,
        latent_channels: int,
        encoder_channels: Sequence[int],
        encoder_blocks: Sequence[int],
        decoder_channels: Sequence[int],
        decoder_blocks: Sequence[int],
        norm_groups: int = 8,
    ):
        super().__init__()
        self.encoder = ImageEncoder(latent_channels, encoder_channels, encoder_blocks, norm_groups)
        self.decoder = MaskDecoder(latent_channels, decoder_channels, decoder_blocks, norm_groups)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(images))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.forward(images).to(torch.float32)
        l1 = F.l1_loss(recon, images.to(torch.float32))
        return {"loss": l1, "l1": l1}


@register_method
class MedDelinea(LatentMaskMethod):
    """Control DiT + DiT in latent space, ε-prediction, Tweedie x0, BCE + Dice on the decoded mask."""

    name = "meddelinea"
    summary = "MedDelinea: Control DiT beside a DiT, in latent space"
    default_scheduler: ClassVar[str] = "euler_ancestral"
    stages: ClassVar[tuple[str, ...]] = ("autoencoder", "denoiser")

    def __init__(self, config: dict[str, Any]):
        super().__init__(self.normalise_config(config))
        c = self.config
        self.image_autoencoder = ImageAutoencoder(
            c["image_latent_channels"], c["image_encoder_channels"], c["image_encoder_blocks"],
            c["image_decoder_channels"], c["image_decoder_blocks"], c["norm_groups"],
        )
        self.mask_autoencoder = MaskAutoencoder(
            c["mask_latent_channels"], c["mask_encoder_channels"], c["mask_encoder_blocks"],
            c["mask_decoder_channels"], c["mask_decoder_blocks"], c["norm_groups"],
        )
        try:
            self.denoiser = ControlledDiT(
                c["mask_latent_channels"], c["image_latent_channels"], c["num_organs"], c["dit_width"],
                c["dit_depth"], c["control_depth"], c["dit_heads"], c["patch_size"], c["mlp_ratio"], c["adaln_zero"],
            )
        except ValueError as exc:
            raise ModelError(f"meddelinea config: {exc}") from None

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def default_config(cls, num_organs: int) -> dict[str, Any]:
        """The real configuration (random init), sized to train on a CPU."""
        return _default_config(num_organs)

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        return _default_config(num_organs, tiny=True)

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        for key in ("patch_size", "dit_width", "dit_heads", "dit_depth", "control_depth", "num_train_timesteps"):
            if cfg[key] < 1:
                raise ModelError(f"meddelinea config: {key} must be >= 1, got {cfg[key]}")
        if cfg["control_depth"] > cfg["dit_depth"]:
            raise ModelError(f"meddelinea config: control_depth ({cfg['control_depth']}) cannot exceed dit_depth "
                             f"({cfg['dit_depth']}): each control block feeds the matching DiT block")

    # -- geometry ------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> tuple[int, str]:
        return self.config["patch_size"], f"patches of {self.config['patch_size']}"

    # -- inference (sampling: LatentMaskMethod.sample; steps=1 is the one-step Tweedie estimate) ------
    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        """``Z_o``: the frozen image autoencoder's latent of each window."""
        self._check_windows(images, "images")
        return self.image_autoencoder.encode(images)

    # -- training ------------------------------------------------------------------------
    #: What :meth:`load_pretrained` takes from another model: everything but the Control DiT.
    PRETRAINED_PREFIXES: ClassVar[tuple[str, ...]] = ("image_autoencoder.", "mask_autoencoder.", "denoiser.dit.")

    def load_pretrained(self, path: str | Path) -> dict[str, Any]:
        """Start from a trained ``meddelinea`` model: its autoencoders and DiT, not its Control DiT.

        ``path`` is a model package folder (checked against its sha256) or its
        ``weights.safetensors``. This is the paper's setting: with ``freeze_dit=true`` and the
        autoencoder stage at 0 steps (training config ``"init_from"``), a fresh zero-initialised
        Control DiT learns beside a pretrained, frozen DiT. Returns a JSON-plain description for
        the provenance.
        """
        from ..registry.package import sha256_file

        p, state, _ = self._pretrained_package_state(path)
        n = self._copy_pretrained(state, self.PRETRAINED_PREFIXES, p, "pretrained weights",
                                  "use the same autoencoder and DiT configuration")
        return {"path": str(p.resolve()), "sha256": sha256_file(p), "loaded": list(self.PRETRAINED_PREFIXES),
                "tensors": n}

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        c = self.config
        if self._check_stage(stage) == "autoencoder":
            return self._mask_autoencoder_parameters() + list(self.image_autoencoder.parameters())
        params = list(self.denoiser.control.parameters())
        if not c["freeze_dit"]:
            params += list(self.denoiser.dit.parameters())
        params += list(self.mask_autoencoder.decoder.head.parameters())  # the decoder's last layer
        if not c["freeze_image_encoder"]:
            params += list(self.image_autoencoder.encoder.parameters())
        return params

    def _stage_loss(self, stage, images, masks, organ_ids, generator) -> dict[str, torch.Tensor]:
        c = self.config
        organs = self._check_batch(images, masks, organ_ids)
        masks = masks.to(torch.float32)
        if stage == "autoencoder":
            i = self.image_autoencoder.loss(images)
            if self.mask_autoencoder_fixed:  # a shared mask autoencoder: only the image autoencoder trains
                return {"loss": c["image_loss_weight"] * i["loss"], "image_l1": i["l1"]}
            m = self.mask_autoencoder.loss(masks)
            loss = m["loss"] + c["image_loss_weight"] * i["loss"]
            return {"loss": loss, "mask_bce": m["bce"], "mask_dice": m["dice"], "image_l1": i["l1"]}

        z0, t, noise, alpha_bar, z_t = self._noised_mask_latent(masks, generator)  # Z_m, noised
        with torch.set_grad_enabled(torch.is_grad_enabled() and not c["freeze_image_encoder"]):
            z_o = self.image_autoencoder.encode(images)
        eps = self.denoiser(z_t.to(z_o.dtype), t, z_o, organs).to(torch.float32)
        noise_mse = F.mse_loss(eps, noise)
        z0_hat = self.predicted_x0(z_t, eps, alpha_bar)  # Tweedie
        logits = self.mask_autoencoder.decode(z0_hat).to(torch.float32)
        bce = F.binary_cross_entropy_with_logits(logits, masks)
        dice = soft_dice_loss(logits, masks)
        loss = c["noise_loss_weight"] * noise_mse + c["bce_weight"] * bce + c["dice_weight"] * dice
        return {"loss": loss, "noise_mse": noise_mse, "bce": bce, "dice": dice}
