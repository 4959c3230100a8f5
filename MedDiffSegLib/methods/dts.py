"""DTS — diffusion transformer segmentation with morphology-driven learning (``dts``).

After Kang et al., "Advancing Medical Image Segmentation: Morphology-Driven Learning with
Diffusion Transformer". The mask itself is diffused (pixel space, values in [-1, 1]):

- **denoiser** (:class:`~MedDiffSegLib.networks.dts.DTSDenoiser`): a Swin-transformer encoder
  (MONAI's Swin blocks) over the noisy mask concatenated with the image, a UNet-style decoder,
  a timestep embedding plus an organ embedding (one model serves every organ, as in
  ``guided``); it predicts the clean mask (x0 parameterisation) as logits;
- **conditional encoder τθ** (:class:`~MedDiffSegLib.networks.dts.ConditionalEncoder`): a
  separate Swin encoder on the image with a light decoder; its decoded feature map of every
  level is added to the denoiser decoder's skip connection of that level. It depends on the
  image only: :meth:`DTS.condition` runs it once per window and the engine reuses the result
  for every organ, sample and step. It can be pretrained without labels
  (:mod:`MedDiffSegLib.training.ssl`, ``meddiffseg pretrain``) and loaded with
  :meth:`DTS.load_pretrained` (the trainer's ``init_from``);
- **reverse boundary attention**: the bottleneck's coarse prediction is refined level by level
  to full resolution, each level weighting its features by ``1 − σ(up(S))``;
- **k-neighbour label smoothing** (:func:`k_neighbour_label_smoothing`) of the target in
  multi-organ training (skipped for single-structure models, as in the paper);
- **loss**: Dice + BCE + MSE between the predicted mask and the (smoothed) target, on the
  full-resolution prediction plus, weighted, on every coarser RBA prediction (deep supervision);
- **sampling**: DDIM with few steps (any scheduler of :mod:`MedDiffSegLib.sampling`, a fresh
  one per call); one step predicts x0 from pure noise at the last training timestep.

Differences from the paper's 3D setting: 2D windows (the volume engine slides them over every
slice) and a binary output per organ prompt instead of one multi-class output. k-NLS smooths
the prompted organ's mask, i.e. that organ's class channel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..networks.autoencoders import soft_dice_loss
from ..networks.dts import ConditionalEncoder, DTSDenoiser, check_swin_config, size_multiple
from .base import PIXEL_SCHEDULE, Method, register_method

#: ``format`` written into the metadata of a pretrained conditional encoder's safetensors file.
ENCODER_FORMAT = "meddiffseg-dts-conditional-encoder/1"
#: File name of the pretrained conditional encoder in a ``meddiffseg pretrain`` output folder.
ENCODER_FILE = "encoder.safetensors"
#: Config keys that define the conditional encoder τθ (a pretrained one must match them).
ENCODER_KEYS = ("patch_size", "cond_embed_dim", "cond_depths", "cond_num_heads", "window_size", "mlp_ratio",
                "cond_channels", "norm_groups")
KNLS_MODES = ("auto", "on", "off")


# -- k-neighbour label smoothing ------------------------------------------------------------------


def centroid_distances(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (pixels) of every pixel to the centroid of each class map.

    ``labels[B,C,H,W]``: one binary map per class (values >= 0.5 count as the class). Returns
    ``(distance[B,C,H,W], present[B,C])``; the distance of a class without pixels is undefined
    (0) and ``present`` is False for it.
    """
    if labels.ndim != 4:
        raise ValueError(f"labels must have shape [B,C,H,W], got {list(labels.shape)}")
    b, c, h, w = labels.shape
    fg = (labels >= 0.5).to(torch.float32)
    count = fg.sum((2, 3))
    present = count > 0
    ys = torch.arange(h, dtype=torch.float32, device=labels.device)
    xs = torch.arange(w, dtype=torch.float32, device=labels.device)
    safe = count.clamp_min(1)
    cy = (fg.sum(3) * ys).sum(2) / safe  # [B,C]
    cx = (fg.sum(2) * xs).sum(2) / safe
    dist = torch.sqrt((ys.view(1, 1, h, 1) - cy[:, :, None, None]) ** 2 + (xs.view(1, 1, 1, w) - cx[:, :, None, None]) ** 2)
    return dist * present[:, :, None, None], present


def k_neighbour_label_smoothing(labels: torch.Tensor, alpha: float = 0.1, eps: float = 1.0) -> torch.Tensor:
    """Smooth every class map: ``|y − α / (d + ε)|`` with ``d`` the pixel's distance to the class centroid.

    ``labels[B,C,H,W]`` in {0, 1}; ``d`` is in pixels of the window. Classes with no pixel in a
    window are left as they are. The result is clamped to [0, 1] (with the default ``ε ≥ α``
    the formula never leaves it).
    """
    dist, present = centroid_distances(labels)
    y = labels.to(torch.float32)
    smoothed = (y - float(alpha) / (dist + float(eps))).abs().clamp(0.0, 1.0)
    return torch.where(present[:, :, None, None], smoothed, y).to(labels.dtype)


def smooth_labels(onehot: torch.Tensor, alpha: float = 0.1, eps: float = 1.0) -> torch.Tensor:
    """k-NLS of a one-hot stack of class maps ``[B,C,H,W]``; unchanged for a single structure (``C == 1``)."""
    if onehot.ndim != 4:
        raise ValueError(f"labels must have shape [B,C,H,W], got {list(onehot.shape)}")
    if onehot.shape[1] == 1:
        return onehot
    return k_neighbour_label_smoothing(onehot, alpha, eps)


# -- configuration --------------------------------------------------------------------------------


def _default_config(num_organs: int) -> dict[str, Any]:
    """The real architecture, sized for CPU training: patches of 4, three Swin stages.

    Windows of 128×128 at 2 mm (the training config's) give Swin levels of 32, 16 and 8 tokens
    (a bottleneck of 4); 224×224 windows work as well (56, 28, 14; 7). Window sides must be
    multiples of 32.
    """
    return {
        "num_organs": int(num_organs),
        # patches of the Swin encoders (2 as in Swin-UNETR; 4 quarters the tokens and the CPU time)
        "patch_size": 4,
        # denoiser: Swin encoder over [x_t, image] (width embed_dim·2^i at level i)
        "embed_dim": 24,
        "depths": [2, 2, 2],
        "num_heads": [2, 4, 8],
        "window_size": 8,
        "mlp_ratio": 2.0,
        # conditional encoder τθ (image only) and the width of its decoded maps
        "cond_embed_dim": 16,
        "cond_depths": [2, 2, 2],
        "cond_num_heads": [1, 2, 4],
        "cond_channels": 24,
        # decoder: full-resolution width (twice that at H/2), timestep/organ embedding, GroupNorm groups
        "stem_channels": 8,
        "time_embed_dim": 64,
        "norm_groups": 8,
        # k-neighbour label smoothing: "auto" = on for multi-organ models, off for one structure
        "knls": "auto",
        "knls_alpha": 0.1,
        "knls_eps": 1.0,
        # loss = dice·Dice + bce·BCE + mse·MSE on the output, + deep_supervision × the same on coarser levels
        "dice_weight": 1.0,
        "bce_weight": 1.0,
        "mse_weight": 1.0,
        "deep_supervision_weight": 0.5,
        # pixel-space noise schedule for masks in [-1, 1]
        **PIXEL_SCHEDULE,
    }


def _tiny_config(num_organs: int) -> dict[str, Any]:
    """Milliseconds on a CPU: windows of 32×32 (patches of 2, two Swin stages: levels of 16, 8 and 4 pixels)."""
    cfg = _default_config(num_organs)
    cfg.update({
        "patch_size": 2, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "mlp_ratio": 2.0,
        "cond_embed_dim": 8, "cond_depths": [1, 1], "cond_num_heads": [1, 2], "cond_channels": 8,
        "stem_channels": 4, "time_embed_dim": 16, "norm_groups": 4,
    })
    return cfg


def encoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a (normalised) ``dts`` config that defines the conditional encoder τθ."""
    return {k: config[k] for k in ENCODER_KEYS}


def build_conditional_encoder(config: dict[str, Any]) -> ConditionalEncoder:
    c = config
    return ConditionalEncoder(c["cond_embed_dim"], c["cond_depths"], c["cond_num_heads"], c["window_size"],
                              c["mlp_ratio"], c["cond_channels"], c["norm_groups"],
                              patch_size=c["patch_size"])


@register_method
class DTS(Method):
    """Swin-transformer diffusion segmentation with RBA, k-NLS and an (optionally pretrained) τθ.

    ``condition(images)`` returns a tuple ``(images, map_0, …, map_L)``: the windows themselves
    (the denoiser reads them next to the noisy mask) and τθ's decoded maps.
    """

    name = "dts"
    summary = "DTS: Swin diffusion transformer, boundary attention, k-NLS"
    default_scheduler = "ddim"
    stages: ClassVar[tuple[str, ...]] = ("denoiser",)
    prediction_type: ClassVar[str] = "sample"

    def __init__(self, config: dict[str, Any]):
        super().__init__(self.normalise_config(config))
        c = self.config
        self.cond_encoder = build_conditional_encoder(c)
        self.denoiser = DTSDenoiser(
            c["num_organs"], c["embed_dim"], c["depths"], c["num_heads"], c["window_size"], c["mlp_ratio"],
            c["cond_channels"], c["stem_channels"], c["time_embed_dim"], c["norm_groups"], c["patch_size"],
        )

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def default_config(cls, num_organs: int) -> dict[str, Any]:
        return _default_config(num_organs)

    @classmethod
    def tiny_config(cls, num_organs: int) -> dict[str, Any]:
        return _tiny_config(num_organs)

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        if cfg["knls"] not in KNLS_MODES:
            raise ModelError(f"dts config: knls must be one of {', '.join(KNLS_MODES)}, got {cfg['knls']!r}")
        if len(cfg["cond_depths"]) != len(cfg["depths"]):
            raise ModelError(f"dts config: τθ needs as many Swin stages as the denoiser (cond_depths "
                             f"{cfg['cond_depths']} vs depths {cfg['depths']}): its maps feed every decoder level")
        try:
            check_swin_config("dts denoiser", cfg["embed_dim"], cfg["depths"], cfg["num_heads"], cfg["window_size"],
                              cfg["patch_size"])
            check_swin_config("dts conditional encoder", cfg["cond_embed_dim"], cfg["cond_depths"],
                              cfg["cond_num_heads"], cfg["window_size"], cfg["patch_size"])
        except ValueError as exc:
            raise ModelError(f"dts config: {exc}") from None
        if min(cfg["cond_channels"], cfg["stem_channels"], cfg["time_embed_dim"], cfg["norm_groups"]) < 1:
            raise ModelError("dts config: cond_channels, stem_channels, time_embed_dim and norm_groups must be >= 1")
        if cfg["knls_alpha"] < 0 or cfg["knls_eps"] <= 0:
            raise ModelError("dts config: knls_alpha must be >= 0 and knls_eps > 0")

    @property
    def uses_knls(self) -> bool:
        mode = self.config["knls"]
        return mode == "on" or (mode == "auto" and self.num_organs > 1)

    # -- geometry and checks -------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Window height and width must be multiples of this (the patch size × one 2× merging per Swin stage)."""
        return size_multiple(len(self.config["depths"]), self.config["patch_size"])

    def _window_multiples(self) -> list[tuple[int, str]]:
        return [(self.size_multiple, f"patches of {self.config['patch_size']}, {len(self.config['depths'])} Swin stages")]

    def _check_condition(self, cond) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = len(self.config["depths"]) + 2
        if not isinstance(cond, (tuple, list)) or len(cond) != n or not all(isinstance(c, torch.Tensor) for c in cond):
            raise ValueError(f"cond must be the tuple of {n} tensors returned by condition()")
        image, maps = cond[0], list(cond[1:])
        self._check_windows(image, "cond[0] (the image windows)")
        if any(m.shape[0] != image.shape[0] for m in maps):
            raise ValueError("cond: every tensor must have the same batch size")
        return image, maps

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check_windows(images, "images")
        return (images, *self.cond_encoder(images))

    def expand_condition(self, cond, repeats: int):
        if repeats == 1:
            return cond
        return tuple(c.repeat_interleave(repeats, dim=0) for c in cond)

    def select_condition(self, cond, rows: torch.Tensor):
        return tuple(c[rows] for c in cond)

    def _logits(self, x_t, t, image, organs, maps) -> torch.Tensor:
        return self.denoiser(x_t, t, image, organs, maps)[0]

    def _sample(self, cond, organ_ids, num_samples, steps, generator, scheduler) -> torch.Tensor:
        image, maps = self._check_condition(cond)
        b, _, h, w = image.shape
        organs = self._check_organs(organ_ids, b).to(image.device)
        image_n, organs_n, *maps_n = self._per_sample(num_samples, image, organs, *maps)
        x_T = self._starting_noise(b, num_samples, 1, (h, w), generator, image.device, image.dtype)
        if steps == 1:  # the predicted mask itself (its probabilities, not mapped to [-1, 1] and back)
            probs = torch.sigmoid(self._logits(x_T, self._last_timestep(x_T), image_n, organs_n, maps_n).to(torch.float32))
        else:
            def predict_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return torch.sigmoid(self._logits(x, t, image_n, organs_n, maps_n).to(torch.float32)) * 2 - 1

            x0 = self._denoise(predict_x0, x_T, steps, scheduler, generator, clip=1.0)
            probs = ((x0.to(torch.float32) + 1) / 2).clamp(0.0, 1.0)
        return probs.view(b, num_samples, h, w)

    # -- training ------------------------------------------------------------------------
    def target(self, masks: torch.Tensor) -> torch.Tensor:
        """The training target for binary masks ``[B,1,H,W]``: k-NLS smoothed when :attr:`uses_knls`."""
        masks = masks.to(torch.float32)
        if not self.uses_knls:
            return masks
        return k_neighbour_label_smoothing(masks, self.config["knls_alpha"], self.config["knls_eps"])

    def segmentation_loss(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dice + BCE + MSE of ``logits`` against a soft ``target`` of the same size (weighted sum in ``"loss"``)."""
        c = self.config
        logits = logits.to(torch.float32)
        dice = soft_dice_loss(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        mse = F.mse_loss(torch.sigmoid(logits), target)
        return {"loss": c["dice_weight"] * dice + c["bce_weight"] * bce + c["mse_weight"] * mse,
                "dice": dice, "bce": bce, "mse": mse}

    def _stage_loss(self, stage, images, masks, organ_ids, generator) -> dict[str, torch.Tensor]:
        organs = self._check_batch(images, masks, organ_ids)
        maps = self.cond_encoder(images)
        t, _, _, x_t = self._noised(masks.to(torch.float32) * 2 - 1, generator)
        preds = self.denoiser(x_t.to(images.dtype), t, images, organs, maps)
        target = self.target(masks)
        terms = self.segmentation_loss(preds[0], target)
        deep = torch.zeros((), device=images.device)
        for p in preds[1:]:
            deep = deep + self.segmentation_loss(p, F.adaptive_avg_pool2d(target, p.shape[-2:]))["loss"]
        deep = deep / max(1, len(preds) - 1)
        terms["deep_supervision"] = deep
        terms["loss"] = terms["loss"] + self.config["deep_supervision_weight"] * deep
        return terms

    # -- pretrained conditional encoder --------------------------------------------------
    def load_pretrained(self, path: str | Path) -> dict[str, Any]:
        """Load τθ from a ``meddiffseg pretrain`` output (its folder or its ``encoder.safetensors``).

        The file's recorded τθ configuration must equal this model's; returns a JSON-plain
        description of what was loaded (path, sha256, pretraining steps) for the provenance.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        from ..registry.package import sha256_file

        p = Path(path).expanduser()
        if p.is_dir():
            p = p / ENCODER_FILE
        if not p.is_file():
            raise ModelError(f"pretrained encoder {p} does not exist (init_from names a 'meddiffseg pretrain' "
                             f"output folder or its {ENCODER_FILE})")
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            state = load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise ModelError(f"cannot read pretrained encoder {p}: {exc}") from None
        if meta.get("format") != ENCODER_FORMAT:
            raise ModelError(f"{p} is not a pretrained dts conditional encoder (format {meta.get('format')!r}, "
                             f"expected {ENCODER_FORMAT!r})")
        try:
            theirs = json.loads(meta.get("encoder_config", "null"))
        except ValueError:
            theirs = None
        mine = encoder_config(self.config)
        if theirs != mine:
            diff = sorted(k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k])
            raise ModelError(f"pretrained encoder {p} was made for another conditional encoder (differs in "
                             f"{', '.join(diff)}: {({k: theirs.get(k) for k in diff} if isinstance(theirs, dict) else theirs)} "
                             f"vs this model's {({k: mine[k] for k in diff})}); pretrain with the same method_config")
        try:
            self.cond_encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"pretrained encoder {p} does not fit this model's conditional encoder: {exc}") from None
        info: dict[str, Any] = {"path": str(p.resolve()), "sha256": sha256_file(p), "name": meta.get("name")}
        try:
            info["steps"] = int(meta["steps"]) if "steps" in meta else None
            info["preprocessing"] = json.loads(meta["preprocessing"]) if "preprocessing" in meta else None
        except ValueError:
            raise ModelError(f"{p}: unreadable metadata (steps {meta.get('steps')!r})") from None
        return info


def count_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a ``dts`` model built from ``config``: τθ, denoiser, total."""
    m = DTS(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"conditional_encoder": count(m.cond_encoder), "denoiser": count(m.denoiser), "total": count(m)}
