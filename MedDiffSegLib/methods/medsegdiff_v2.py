"""MedSegDiff-V2 — pixel-space diffusion with anchor and semantic conditioning (AAAI 2024).

Wu et al., "MedSegDiff-V2: Diffusion-Based Medical Image Segmentation with Transformer".
The mask itself is diffused (pixel space, ``x0 = 2·mask − 1``); a diffusion UNet predicts the
noise ``ε``. The image enters only through a separate *condition model* (a UNet on the raw
window) and two mechanisms:

- **anchor condition (U-SA)**: the condition model's last decoded feature and its anchor
  prediction for the prompted organ, Gaussian-smoothed and max-combined, become a spatial
  attention on the diffusion encoder's first feature;
- **semantic condition (SS-Former)**: the condition model's bottleneck embedding and the
  diffusion bottleneck attend to each other with an affinity computed in Fourier space and
  filtered by a timestep-dependent neural band-pass filter.

The anchor prediction is supervised directly (Dice + ``β``·cross-entropy) on the training
rows whose timestep is a multiple of ``α`` (``anchor_every``; ``α = 5``, ``β = 10`` as in the
paper); condition and diffusion model train jointly, end to end, in one stage (named
``denoiser`` like the last stage of the latent methods, so training configs carry over).

Our extension: organ prompts — a class embedding added to the diffusion UNet's timestep
embedding, and one anchor map per organ from the condition model — so one model segments
many organs. The network pieces live in :mod:`MedDiffSegLib.networks.medsegdiff`.

Inference: :meth:`condition` runs the condition model once per window and keeps only what the
reverse chains need (the U-SA logits for *every* organ, the semantic embedding);
:meth:`expand_condition` only repeats row indices, nothing is copied; :meth:`sample` draws all
starting noise, then denoises the chains (window × organ × sample) in passes of at most
``chains_per_pass`` (full-resolution chains are memory-hungry), each pass with a fresh
scheduler (DDIM by default; DDPM and the others selectable), and returns
``(clip(x̂0) + 1) / 2`` as the foreground probability of each of the ``N`` chains. The engine
fuses the ``N`` samples (mean and variance; SimpleITK's STAPLE with ``--staple``).

Steps and samples: the paper samples 100 steps × 10 samples on a GPU. The CPU training config
(``training/configs/medsegdiff-v2-abdomen-ct.json``) ships ``steps: 10, samples: 3`` (DDIM) in
its ``inference`` block — about 6 s per batch of 8 windows of 224² and one organ on two CPU
cores; ``--steps``/``--samples`` override them. :meth:`paper_config` is the GPU scale.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..networks.medsegdiff import AnchorSpatialAttention, ConditionUNet, DiffusionUNet
from .base import PIXEL_SCHEDULE, Method, register_method

#: Masks are diffused as ``2·mask − 1``: x0 estimates are clipped to [-1, 1].
MASK_RANGE = 1.0


class MedSegDiffCondition(NamedTuple):
    """What :meth:`MedSegDiffV2.condition` returns: image-only tensors plus the rows that use them.

    ``anchor_logits``: U-SA attention logits ``[B,O,H,W]`` for every organ; ``semantic``: the
    condition embedding ``[B,S,h,w]``; ``rows``: ``[B']`` indices into the first axis —
    :meth:`MedSegDiffV2.expand_condition` repeats these, not the tensors.
    """

    anchor_logits: torch.Tensor
    semantic: torch.Tensor
    rows: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])


@register_method
class MedSegDiffV2(Method):
    """MedSegDiff-V2 with organ prompts (see the module docstring)."""

    name = "medsegdiff_v2"
    summary = "MedSegDiff-V2: pixel-space UNet, U-SA anchor + SS-Former"
    default_scheduler = "ddim"
    stages: ClassVar[tuple[str, ...]] = ("denoiser",)

    def __init__(self, config: dict[str, Any]):
        super().__init__(self.normalise_config(config))
        c = self.config
        self.diffusion_model = DiffusionUNet(
            c["unet_channels"], c["unet_res_blocks"], c["num_organs"], c["time_embed_dim"], c["norm_groups"],
            c["ssformer_depth"], c["ssformer_heads"], c["ssformer_mlp_ratio"], c["filter_channels"], c["filter_blocks"],
        )
        self.condition_model = ConditionUNet(
            c["condition_channels"], c["condition_blocks"], c["num_organs"], self.diffusion_model.semantic_channels,
            c["norm_groups"],
        )
        self.anchor_attention = AnchorSpatialAttention(
            self.condition_model.feature_channels, c["anchor_kernel_size"], c["anchor_sigma"]
        )

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def default_config(cls, num_organs: int) -> dict[str, Any]:
        """The CPU configuration: windows of 224×224 (bottleneck 14×14), 1.74 M parameters with 8 organs."""
        return {
            "num_organs": int(num_organs),
            # condition model (a UNet on the raw image): widths at H, H/2, ..., residual blocks per level
            "condition_channels": [8, 16, 32, 64, 64],
            "condition_blocks": [0, 1, 1, 1, 1],
            # diffusion model (a UNet on the noisy mask); no residual block at full resolution
            "unet_channels": [8, 16, 32, 64, 64],
            "unet_res_blocks": [0, 1, 1, 1, 1],
            "time_embed_dim": 128,
            "norm_groups": 8,
            # U-SA: learnable Gaussian (kernel size, initial sigma in pixels)
            "anchor_kernel_size": 7,
            "anchor_sigma": 1.5,
            # SS-Former (paper: 4 blocks) and its neural band-pass filters (paper: 6 blocks)
            "ssformer_depth": 4,
            "ssformer_heads": 4,
            "ssformer_mlp_ratio": 2.0,
            "filter_channels": 32,
            "filter_blocks": 6,
            # anchor supervision: Dice + β·CE on rows with t % α == 0 (paper: α = 5, β = 10)
            "anchor_every": 5,
            "anchor_ce_weight": 10.0,
            "anchor_loss_weight": 1.0,
            # reverse chains (window × organ × sample) denoised together at most; 0: all at once
            "chains_per_pass": 32,
            # pixel-space noise schedule (paper: linear, 1000 steps)
            **PIXEL_SCHEDULE,
        }

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        """Milliseconds on a CPU: windows of 32×32, bottleneck 8×8."""
        cfg = cls.default_config(num_organs)
        cfg.update({
            "condition_channels": [4, 8, 8],
            "condition_blocks": [0, 1, 1],
            "unet_channels": [4, 8, 8],
            "unet_res_blocks": [1, 1, 1],
            "time_embed_dim": 16,
            "norm_groups": 4,
            "anchor_kernel_size": 3,
            "ssformer_depth": 2,
            "ssformer_heads": 2,
            "filter_channels": 8,
            "filter_blocks": 2,
        })
        return cfg

    @classmethod
    def paper_config(cls, num_organs: int) -> dict[str, Any]:
        """The paper's scale (GPU): windows of 256×256, guided-diffusion widths 128·(1,1,2,2,4,4), 2 blocks per level."""
        cfg = cls.default_config(num_organs)
        cfg.update({
            "condition_channels": [64, 128, 256, 512, 512, 512],
            "condition_blocks": [2, 2, 2, 2, 2, 2],
            "unet_channels": [128, 128, 256, 256, 512, 512],
            "unet_res_blocks": [2, 2, 2, 2, 2, 2],
            "time_embed_dim": 512,
            "norm_groups": 32,
            "ssformer_heads": 8,
            "filter_channels": 64,
            "chains_per_pass": 16,
        })
        return cfg

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        if cfg["anchor_every"] < 1:
            raise ModelError(f"{cls.name} config: anchor_every must be >= 1, got {cfg['anchor_every']}")
        if cfg["chains_per_pass"] < 0:
            raise ModelError(f"{cls.name} config: chains_per_pass must be >= 0, got {cfg['chains_per_pass']}")

    # -- geometry and checks -------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Window height and width must be multiples of this (both UNets halve it ``levels − 1`` times)."""
        return max(self.diffusion_model.size_multiple, self.condition_model.size_multiple)

    def _window_multiples(self) -> list[tuple[int, str]]:
        return [(self.size_multiple, "")]

    # -- the condition model -------------------------------------------------------------
    def _condition_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(feature, anchor_logits [B,O,H,W], semantic at the diffusion bottleneck size)``."""
        feature, anchor, semantic = self.condition_model(images)
        size = self.diffusion_model.bottleneck_size(*images.shape[-2:])
        if tuple(semantic.shape[-2:]) != size:
            if semantic.shape[-2] > size[0]:
                semantic = F.adaptive_avg_pool2d(semantic, size)
            else:
                semantic = F.interpolate(semantic, size=size, mode="bilinear", align_corners=False)
        return feature, anchor, semantic

    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> MedSegDiffCondition:
        self._check_windows(images, "images")
        feature, anchor, semantic = self._condition_outputs(images)
        logits = self.anchor_attention.organ_logits(feature, torch.sigmoid(anchor))
        rows = torch.arange(images.shape[0], device=images.device)
        return MedSegDiffCondition(logits, semantic, rows)

    def expand_condition(self, cond: MedSegDiffCondition, repeats: int) -> MedSegDiffCondition:
        if repeats == 1:
            return cond
        return cond._replace(rows=cond.rows.repeat_interleave(int(repeats)))

    def select_condition(self, cond: MedSegDiffCondition, rows: torch.Tensor) -> MedSegDiffCondition:
        return cond._replace(rows=cond.rows[rows.to(cond.rows.device)])

    @torch.no_grad()
    def anchor(self, images: torch.Tensor) -> torch.Tensor:
        """The condition model's own anchor probabilities ``[B,O,H,W]`` (no diffusion)."""
        self._check_windows(images, "images")
        return torch.sigmoid(self.condition_model(images)[1].to(torch.float32))

    # -- inference -----------------------------------------------------------------------
    def _sample(self, cond: MedSegDiffCondition, organ_ids, num_samples, steps, generator, scheduler) -> torch.Tensor:
        if not isinstance(cond, MedSegDiffCondition):
            raise ValueError(f"cond must come from {self.name}'s condition(), got {type(cond).__name__}")
        b = cond.num_rows
        organs = self._check_organs(organ_ids, b).to(cond.rows.device)
        logits = cond.anchor_logits[cond.rows, organs][:, None]  # [b,1,H,W]: the prompted organ's attention
        semantic = cond.semantic[cond.rows]
        h, w = logits.shape[-2:]
        logits_n, semantic_n, organs_n = self._per_sample(num_samples, logits, semantic, organs)
        x_T = self._starting_noise(b, num_samples, 1, (h, w), generator, logits.device, semantic.dtype)
        # Full-resolution chains are memory-hungry: run at most `chains_per_pass` of them together, each
        # pass with its own fresh scheduler. All starting noise is drawn above, so a deterministic
        # scheduler (DDIM) gives the same result for any pass size; the stochastic ones draw their
        # step noise pass after pass, which is reproducible for a given config.
        chunk = self.config["chains_per_pass"] or x_T.shape[0]
        parts = []
        for i in range(0, x_T.shape[0], chunk):
            j = slice(i, i + chunk)
            parts.append(self._denoise(  # steps=1 too is the scheduler's step: no single-step path of its own
                lambda x, t, j=j: self.diffusion_model(x, t, organs_n[j], logits_n[j], semantic_n[j]),
                x_T[j], steps, scheduler, generator, MASK_RANGE, single_step=False,
            ))
        x0 = parts[0] if len(parts) == 1 else torch.cat(parts)
        probs = (x0.to(torch.float32).clamp(-MASK_RANGE, MASK_RANGE) + 1) / 2
        return probs.view(b, num_samples, h, w)

    # -- training ------------------------------------------------------------------------
    def _stage_loss(self, stage, images, masks, organ_ids, generator) -> dict[str, torch.Tensor]:
        """``MSE(ε̂, ε) + λ·(k/B)·(Dice + β·BCE)`` of the anchor on the ``k`` rows with ``t % α == 0``.

        The ``k/B`` factor makes the anchor term's expected weight ``λ/α`` per row, as when the
        paper adds it on every α-th timestep. ``anchor_dice``/``anchor_ce`` are reported over
        all rows (for monitoring); ``anchor_rows`` is ``k``.
        """
        organs = self._check_batch(images, masks, organ_ids)
        c = self.config
        b = images.shape[0]
        rows = torch.arange(b, device=images.device)

        feature, anchor, semantic = self._condition_outputs(images)
        anchor_o = anchor[rows, organs][:, None].to(torch.float32)  # the prompted organ's anchor logits
        attention = self.anchor_attention.logits(torch.cat([feature, torch.sigmoid(anchor_o).to(feature.dtype)], 1))

        target = masks.to(torch.float32)
        t, noise, _, x_t = self._noised(target * 2 - 1, generator)
        eps = self.diffusion_model(x_t.to(feature.dtype), t, organs, attention, semantic).to(torch.float32)
        noise_mse = F.mse_loss(eps, noise)

        prob = torch.sigmoid(anchor_o)
        inter = (prob * target).flatten(1).sum(1)
        denom = (prob + target).flatten(1).sum(1)
        ce = F.binary_cross_entropy_with_logits(anchor_o, target, reduction="none").flatten(1).mean(1)
        selected = (t % c["anchor_every"] == 0)
        k = int(selected.sum())
        if k:
            sel = selected.to(torch.float32)
            # Dice pooled over the selected rows (an empty window alone would be a degenerate 0/0)
            dice_sel = 1 - (2 * (inter * sel).sum() + 1) / ((denom * sel).sum() + 1)
            ce_sel = (ce * sel).sum() / k
            anchor_loss = (k / b) * (dice_sel + c["anchor_ce_weight"] * ce_sel)
        else:
            anchor_loss = anchor_o.new_zeros(())
        loss = noise_mse + c["anchor_loss_weight"] * anchor_loss
        with torch.no_grad():
            dice_all = 1 - (2 * inter.sum() + 1) / (denom.sum() + 1)
        return {
            "loss": loss,
            "noise_mse": noise_mse.detach(),
            "anchor_loss": anchor_loss.detach(),
            "anchor_dice": dice_all,
            "anchor_ce": ce.mean().detach(),
            "anchor_rows": torch.tensor(float(k)),
        }
