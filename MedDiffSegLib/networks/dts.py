"""Networks of the ``dts`` method: Swin-transformer encoders, a UNet-style decoder, reverse boundary attention.

Everything works on 2D windows ``[B,C,H,W]`` at full resolution (DTS diffuses the mask itself,
not a latent). The Swin parts are MONAI's building blocks (``PatchEmbed``, ``BasicLayer`` with
shifted-window ``SwinTransformerBlock`` s and ``PatchMerging``); this module only stacks them,
so that a timestep/organ embedding can be added between the stages.

Resolutions, with ``L = len(depths)`` Swin stages and a patch size ``p`` (2 as in Swin-UNETR,
or 4 to cut the token count, and so the CPU time, by four)::

    level 0: H/p        width C        (patch embedding)
    level i: H/(p·2^i)  width C·2^i    (after Swin stages 0..i-1; each ends in a 2× patch merging)
    level L: H/(p·2^L)  width C·2^L    (the bottleneck)

so window sides must be multiples of ``p·2^L`` (:func:`size_multiple`). Between level 0 and
full resolution the denoiser has convolutional levels at H/2^j (j = log2(p)-1 … 0).

- :class:`SwinEncoder` — patch embedding and ``L`` Swin stages; returns the features of every
  level, optionally shifted by a per-sample embedding (timestep + organ) before each stage.
- :class:`ConditionalEncoder` — τθ: a Swin encoder on the image alone plus a light top-down
  decoder (lateral 1×1 convolutions, upsampling, 3×3 smoothing) whose decoded feature maps, one
  per level, feed the denoiser's decoder. It depends on the image only, so it runs once per
  window whatever the number of organs, samples and steps.
- :class:`ReverseBoundaryAttention` — ``R = 1 − σ(up(S))`` from a deeper stage's prediction
  ``S`` weights the features of the next (finer) level; two convolutions with normalisation
  turn the weighted features into a residual that refines ``up(S)`` into this level's prediction.
- :class:`DTSDenoiser` — Swin encoder over ``[x_t, image]``, UNet-style decoder with timestep and
  organ embedding, τθ's maps added to its skip connections, and an RBA chain from the
  bottleneck to full resolution. Returns mask logits at every level (finest first).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoders import group_norm

#: Patch sizes of the patch embedding that the networks support (powers of two).
PATCH_SIZES = (2, 4)


def size_multiple(num_stages: int, patch_size: int = 2) -> int:
    """Window sides must be multiples of this: the patch size times one 2× merging per Swin stage."""
    return int(patch_size) * 2 ** int(num_stages)


def level_widths(embed_dim: int, num_stages: int) -> list[int]:
    """Channel widths of levels ``0..L``: ``embed_dim · 2^i``."""
    return [int(embed_dim) * 2**i for i in range(int(num_stages) + 1)]


def channel_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channel axis of ``[B,C,H,W]`` without affine parameters."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)


def check_swin_config(
    what: str, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int, patch_size: int = 2
) -> None:
    """Raise ``ValueError`` with a readable message for an impossible Swin configuration."""
    depths, num_heads = list(depths), list(num_heads)
    if int(patch_size) not in PATCH_SIZES:
        raise ValueError(f"{what}: patch_size must be one of {PATCH_SIZES}, got {patch_size}")
    if int(embed_dim) < 1:
        raise ValueError(f"{what}: embed_dim must be >= 1, got {embed_dim}")
    if not depths or min(depths) < 1:
        raise ValueError(f"{what}: depths must be one positive block count per Swin stage, got {depths}")
    if len(num_heads) != len(depths):
        raise ValueError(f"{what}: num_heads needs one entry per stage ({len(depths)}), got {num_heads}")
    for i, (w, h) in enumerate(zip(level_widths(embed_dim, len(depths)), num_heads)):
        if h < 1 or w % h:
            raise ValueError(f"{what}: stage {i} has width {w}, which {h} heads do not divide")
    if int(window_size) < 1:
        raise ValueError(f"{what}: window_size must be >= 1, got {window_size}")


class SwinEncoder(nn.Module):
    """Patch embedding + ``len(depths)`` MONAI Swin stages; ``forward`` returns the features of every level.

    With ``emb_dim`` set, ``forward(x, emb)`` adds a learned projection of the per-sample
    embedding ``emb[B,emb_dim]`` to the tokens before every stage and to the bottleneck.
    Returned features are layer-normalised over channels (as Swin-UNETR's skip features).
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        emb_dim: int | None = None,
        patch_size: int = 2,
    ):
        super().__init__()
        from monai.networks.blocks import PatchEmbed
        from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging

        check_swin_config("SwinEncoder", embed_dim, depths, num_heads, window_size, patch_size)
        self.patch_size = int(patch_size)
        self.widths = level_widths(embed_dim, len(depths))
        self.patch_embed = PatchEmbed(patch_size=self.patch_size, in_chans=int(in_channels), embed_dim=int(embed_dim),
                                      norm_layer=nn.LayerNorm, spatial_dims=2)
        self.stages = nn.ModuleList(
            BasicLayer(dim=self.widths[i], depth=int(d), num_heads=int(h), window_size=(int(window_size),) * 2,
                       drop_path=[0.0] * int(d), mlp_ratio=float(mlp_ratio), qkv_bias=True,
                       norm_layer=nn.LayerNorm, downsample=PatchMerging)
            for i, (d, h) in enumerate(zip(depths, num_heads))
        )
        self.emb_proj = None
        if emb_dim:
            self.emb_proj = nn.ModuleList(nn.Linear(int(emb_dim), w) for w in self.widths)

    @property
    def size_multiple(self) -> int:
        return size_multiple(len(self.stages), self.patch_size)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        if (emb is None) != (self.emb_proj is None):
            raise ValueError("SwinEncoder: pass an embedding exactly when the encoder was built with emb_dim")
        h = self.patch_embed(x)
        feats = []
        for i in range(len(self.widths)):
            if emb is not None:
                h = h + self.emb_proj[i](emb).to(h.dtype)[:, :, None, None]
            feats.append(channel_layer_norm(h))
            if i < len(self.stages):
                h = self.stages[i](h.contiguous())
        return feats


class ConvNormAct(nn.Sequential):
    """3×3 convolution (optionally strided) → GroupNorm → SiLU."""

    def __init__(self, in_ch: int, out_ch: int, norm_groups: int = 8, stride: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         group_norm(out_ch, norm_groups), nn.SiLU())


class ConditionalEncoder(nn.Module):
    """τθ: image window ``[B,1,H,W]`` → decoded feature maps, one per level (``[B,channels,H/2^(i+1),…]``).

    A Swin encoder reads the image; a light top-down decoder (feature-pyramid style: 1×1 lateral
    projections, nearest upsampling, a 3×3 convolution with normalisation per level) decodes its
    features into maps that carry the global context of the window down to every resolution.
    """

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        channels: int = 24,
        norm_groups: int = 8,
        in_channels: int = 1,
        patch_size: int = 2,
    ):
        super().__init__()
        self.encoder = SwinEncoder(in_channels, embed_dim, depths, num_heads, window_size, mlp_ratio,
                                   patch_size=patch_size)
        self.channels = int(channels)
        widths = self.encoder.widths
        self.lateral = nn.ModuleList(nn.Conv2d(w, self.channels, 1) for w in widths)
        self.smooth = nn.ModuleList(ConvNormAct(self.channels, self.channels, norm_groups) for _ in widths)

    @property
    def widths(self) -> list[int]:
        return self.encoder.widths

    @property
    def size_multiple(self) -> int:
        return self.encoder.size_multiple

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(encoder features, decoded maps)``, both finest level first."""
        feats = self.encoder(x)
        decoded: list[torch.Tensor] = [None] * len(feats)  # type: ignore[list-item]
        g = None
        for i in range(len(feats) - 1, -1, -1):
            lat = self.lateral[i](feats[i])
            if g is not None:
                lat = lat + F.interpolate(g, size=lat.shape[-2:], mode="nearest")
            g = self.smooth[i](lat)
            decoded[i] = g
        return feats, decoded

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x)[1]


class EmbBlock(nn.Module):
    """Convolution block conditioned on an embedding: conv → GN → +emb → SiLU (→ conv → GN → SiLU), residual.

    ``convs=1`` keeps only the first convolution (used at full resolution, where every
    convolution costs most); the residual path is a 1×1 projection when widths differ.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, norm_groups: int = 8, convs: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = group_norm(out_ch, norm_groups)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False) if convs > 1 else None
        self.norm2 = group_norm(out_ch, norm_groups) if convs > 1 else None
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x)) + self.emb(emb).to(x.dtype)[:, :, None, None]
        h = F.silu(h)
        if self.conv2 is not None:
            h = F.silu(self.norm2(self.conv2(h)))
        return self.skip(x) + h


class ReverseBoundaryAttention(nn.Module):
    """Refine a coarse prediction with the features of a finer level.

    ``forward(features[B,C,h,w], coarse[B,1,h',w'])`` upsamples the coarse logits to ``h×w``,
    weights the features by the reverse attention ``R = 1 − σ(up(coarse))`` (large where the
    coarse map is not yet confident foreground: background and boundaries), refines them with
    two 3×3 convolutions (the first followed by GroupNorm and SiLU) into a one-channel residual
    and returns ``up(coarse) + residual`` and the weighted features.
    """

    def __init__(self, channels: int, norm_groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = group_norm(channels, norm_groups)
        self.conv2 = nn.Conv2d(channels, 1, 3, padding=1)

    @staticmethod
    def upsample(coarse: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(coarse.shape[-2:]) == tuple(size):
            return coarse
        return F.interpolate(coarse, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, features: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.upsample(coarse, features.shape[-2:]).to(features.dtype)
        reverse = 1 - torch.sigmoid(up)
        attended = features * reverse
        residual = self.conv2(F.silu(self.norm(self.conv1(attended))))
        return up + residual, attended


class DTSDenoiser(nn.Module):
    """``(x_t[B,1,H,W], t[B], image[B,1,H,W], organ_ids[B], cond maps) -> logits``, one map per level, finest first.

    - a per-sample embedding: sinusoidal timestep embedding → MLP, plus a learned organ embedding;
    - a Swin encoder over ``[x_t, image]`` (the embedding is added before every Swin stage) and
      convolutional stems at the resolutions finer than its patches (full resolution with
      ``stem_channels``, and H/2 with twice as many when the patch size is 4);
    - a UNet-style decoder: nearest upsampling, concatenation with the skip feature of that level
      (to which τθ's decoded map of the level is added after a 1×1 projection) and an
      embedding-conditioned convolution block, from the bottleneck down to full resolution;
    - a prediction at the bottleneck refined level by level to full resolution by
      :class:`ReverseBoundaryAttention`.

    ``forward`` returns ``[S_full, …, S_bottleneck]``: ``S_full`` at ``H×W`` is the output, the
    coarser ones serve deep supervision.
    """

    def __init__(
        self,
        num_organs: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        cond_channels: int = 24,
        stem_channels: int = 8,
        time_embed_dim: int = 64,
        norm_groups: int = 8,
        patch_size: int = 2,
    ):
        super().__init__()
        e = int(time_embed_dim)
        self.time_embed_dim = e
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.organ_embed = nn.Embedding(int(num_organs), e)
        self.encoder = SwinEncoder(2, embed_dim, depths, num_heads, window_size, mlp_ratio, emb_dim=e,
                                   patch_size=patch_size)
        widths = self.encoder.widths
        # convolutional levels finer than the patches: H/2^j with stem_channels·2^j, j = 0 … log2(p)-1
        n_hires = int(patch_size).bit_length() - 1
        hires = [int(stem_channels) * 2**j for j in range(n_hires)]
        self.hires_widths = hires
        self.stems = nn.ModuleList(
            ConvNormAct(2 if j == 0 else hires[j - 1], hires[j], norm_groups, stride=1 if j == 0 else 2)
            for j in range(n_hires)
        )
        self.cond_proj = nn.ModuleList(nn.Conv2d(int(cond_channels), w, 1) for w in widths)
        self.bottleneck = EmbBlock(widths[-1], widths[-1], e, norm_groups)
        self.up_blocks = nn.ModuleList(
            EmbBlock(widths[i + 1] + widths[i], widths[i], e, norm_groups) for i in range(len(widths) - 1)
        )
        coarser = [widths[0]] + hires[::-1][:-1]  # width arriving at each hi-res level, coarsest first
        self.hires_blocks = nn.ModuleList(
            EmbBlock(c + h, h, e, norm_groups, convs=1) for c, h in zip(coarser, hires[::-1])
        )
        self.head = nn.Conv2d(widths[-1], 1, 1)
        self.rba = nn.ModuleList(ReverseBoundaryAttention(w, norm_groups) for w in widths[:-1])
        self.rba_hires = nn.ModuleList(ReverseBoundaryAttention(h, norm_groups) for h in hires[::-1])

    @property
    def size_multiple(self) -> int:
        return self.encoder.size_multiple

    def embedding(self, t: torch.Tensor, organ_ids: torch.Tensor) -> torch.Tensor:
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        temb = get_timestep_embedding(t.reshape(-1).float(), self.time_embed_dim)
        return self.time_mlp(temb.to(self.time_mlp[0].weight.dtype)) + self.organ_embed(organ_ids.long())

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        image: torch.Tensor,
        organ_ids: torch.Tensor,
        cond: Sequence[torch.Tensor],
    ) -> list[torch.Tensor]:
        widths = self.encoder.widths
        if len(cond) != len(widths):
            raise ValueError(f"DTSDenoiser: expected {len(widths)} conditional maps, got {len(cond)}")
        emb = self.embedding(t, organ_ids)
        x = torch.cat([x_t, image.to(x_t.dtype)], dim=1)
        stems = []
        h = x
        for stem in self.stems:
            h = stem(h)
            stems.append(h)
        feats = self.encoder(x, emb)
        skips = [f + p(c.to(f.dtype)) for f, p, c in zip(feats, self.cond_proj, cond)]
        bottleneck = self.bottleneck(skips[-1], emb)
        d = bottleneck
        decoded = []  # decoder outputs of the Swin levels L-1 … 0
        for i in range(len(widths) - 2, -1, -1):
            up = F.interpolate(d, size=skips[i].shape[-2:], mode="nearest")
            d = self.up_blocks[i](torch.cat([up, skips[i]], dim=1), emb)
            decoded.append(d)
        hires = []  # decoder outputs of the convolutional levels, coarsest first
        for block, skip in zip(self.hires_blocks, stems[::-1]):
            up = F.interpolate(d, size=skip.shape[-2:], mode="nearest")
            d = block(torch.cat([up, skip], dim=1), emb)
            hires.append(d)
        # reverse boundary attention, bottleneck → full resolution
        s = self.head(bottleneck)
        preds = [s]
        for i, feat in zip(range(len(widths) - 2, -1, -1), decoded):
            s, _ = self.rba[i](feat, s)
            preds.append(s)
        for rba, feat in zip(self.rba_hires, hires):
            s, _ = rba(feat, s)
            preds.append(s)
        return preds[::-1]
