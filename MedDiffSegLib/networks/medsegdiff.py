"""Networks of MedSegDiff-V2: condition UNet, diffusion UNet, U-SA, SS-Former, neural band-pass filter.

Wu et al., "MedSegDiff-V2: Diffusion-Based Medical Image Segmentation with Transformer"
(AAAI 2024). Written from the paper; every block here is 2D and channels-first.

- :class:`ConditionUNet` — a plain UNet on the raw image window. It returns its last decoded
  (full-resolution) feature, an anchor prediction (one logit map per organ, multi-label) and a
  semantic embedding (its bottleneck, projected to the diffusion bottleneck's width).
- :class:`AnchorSpatialAttention` (U-SA) — the anchor (decoded feature ⊕ the prompted organ's
  anchor probability) is smoothed by a learnable Gaussian kernel, max-combined with itself
  (``max(K∗a, a)``: the smoothing widens the anchored region, the max keeps its peaks), reduced
  to one channel by a 1×1 convolution and squashed by a sigmoid into a spatial attention map
  that rescales the diffusion encoder's first feature.
- :class:`NeuralBandPassFilter` — a stack of 1×1 convolutions over a map of frequency
  coordinates (so the filter is a smooth function of frequency, evaluated on any grid), each
  followed by a layer norm whose scale and shift come from the timestep embedding, ending in a
  sigmoid: a filter in [0, 1] per frequency bin and attention head that changes with ``t``.
- :class:`SpectralCrossAttention` and :class:`SSFormer` — cross-attention between the diffusion
  embedding and the condition embedding whose affinity is computed in Fourier space: the
  cross-spectrum ``Q̂_i(f)·conj(K̂_j(f))`` of every query/key channel pair is multiplied by the
  band-pass filter and transformed back at zero displacement (the inverse FFT at the origin is
  the sum over frequencies), which gives the inner product of the two *band-passed* maps. It is
  normalised to a cosine, scaled by a learned temperature and soft-maxed over key channels; the
  value projection of the other embedding is mixed with it, then an output projection and an
  MLP follow (pre-norm, residual). An SS-Former block holds two such modules, symmetric: the
  condition embedding attends to the diffusion embedding, then the diffusion embedding to the
  updated condition embedding.
- :class:`DiffusionUNet` — a UNet on the noisy mask (pixel space) predicting the noise; the
  timestep embedding plus a learned organ (class) embedding conditions every residual block
  (scale/shift) and the band-pass filters; U-SA acts on its first feature, the SS-Former on its
  bottleneck.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoders import ConvBlock, ResBlock, group_norm


def _int_list(name: str, values: Sequence[int], levels: int | None = None, minimum: int = 1) -> list[int]:
    out = [int(v) for v in values]
    if not out or min(out) < minimum:
        raise ValueError(f"{name} must be a non-empty list of integers >= {minimum}, got {list(values)}")
    if levels is not None and len(out) != levels:
        raise ValueError(f"{name} needs one entry per UNet level ({levels}), got {len(out)}")
    return out


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``[B]`` → ``[B, dim]`` (MONAI's)."""
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    return get_timestep_embedding(t.reshape(-1).to(torch.float32), int(dim))


# -- condition model -------------------------------------------------------------------------------


class ConditionUNet(nn.Module):
    """Image window ``[B,1,H,W]`` → ``(feature [B,C0,H,W], anchor_logits [B,O,H,W], semantic [B,S,h,w])``.

    ``channels[i]`` is the width at resolution ``H/2^i``; ``blocks[i]`` the residual blocks of
    the encoder at that level. Each decoder level takes the coarser level through a 1×1
    convolution (at the coarse resolution, where it is cheap) and a nearest ×2 upsampling, and
    merges it with the skip by one 3×3 convolution block. ``feature`` is the last decoded map;
    ``semantic`` the bottleneck (``h = H/2^(L-1)``) projected to ``semantic_channels``.
    """

    def __init__(self, channels: Sequence[int], blocks: Sequence[int], num_organs: int, semantic_channels: int,
                 norm_groups: int = 8):
        super().__init__()
        channels = _int_list("condition_channels", channels)
        blocks = _int_list("condition_blocks", blocks, len(channels), minimum=0)
        self.levels = len(channels)
        self.stem = ConvBlock(1, channels[0], 1, norm_groups)
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for i, c in enumerate(channels):
            self.down.append(nn.Identity() if i == 0 else ConvBlock(channels[i - 1], c, 2, norm_groups))
            self.encoder.append(nn.Sequential(*[ResBlock(c, norm_groups) for _ in range(blocks[i])]))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(self.levels - 1):  # decoder level i receives level i+1 upsampled
            self.up.append(nn.Sequential(nn.Conv2d(channels[i + 1], channels[i], 1),
                                         nn.Upsample(scale_factor=2, mode="nearest")))
            self.merge.append(ConvBlock(2 * channels[i], channels[i], 1, norm_groups))
        self.anchor_head = nn.Conv2d(channels[0], int(num_organs), 1)
        self.semantic_head = nn.Sequential(group_norm(channels[-1], norm_groups), nn.SiLU(),
                                           nn.Conv2d(channels[-1], int(semantic_channels), 1))
        self.feature_channels = channels[0]
        self.size_multiple = 2 ** (self.levels - 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.stem(images)
        skips = []
        for down, enc in zip(self.down, self.encoder):
            h = enc(down(h))
            skips.append(h)
        semantic = self.semantic_head(h)
        for i in reversed(range(self.levels - 1)):
            h = self.merge[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return h, self.anchor_head(h), semantic


# -- anchor condition: U-SA ------------------------------------------------------------------------


class LearnableGaussianBlur(nn.Module):
    """Depthwise, separable Gaussian smoothing with one learnable width (sigma, pixels) per channel."""

    def __init__(self, channels: int, kernel_size: int = 7, sigma: float = 1.5):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"anchor_kernel_size must be a positive odd number, got {kernel_size}")
        if sigma <= 0:
            raise ValueError(f"anchor_sigma must be > 0, got {sigma}")
        self.kernel_size = int(kernel_size)
        self.log_sigma = nn.Parameter(torch.full((int(channels),), math.log(float(sigma))))

    def kernel(self, channels: slice | None = None) -> torch.Tensor:
        """Normalised 1D kernels ``[C, k]`` (float32)."""
        sigma = self.log_sigma.to(torch.float32).exp().clamp(min=1e-2)
        if channels is not None:
            sigma = sigma[channels]
        r = self.kernel_size // 2
        x = torch.arange(-r, r + 1, device=sigma.device, dtype=torch.float32)
        g = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
        return g / g.sum(dim=1, keepdim=True)

    def smooth(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Smooth ``x [B,C,H,W]`` with ``kernel [C,k]`` (zero padding: "same" size)."""
        c, k = kernel.shape
        if x.shape[1] != c:
            raise ValueError(f"expected {c} channels, got {x.shape[1]}")
        kern = kernel.to(x.dtype)
        x = F.conv2d(x, kern.view(c, 1, k, 1), padding=(k // 2, 0), groups=c)
        return F.conv2d(x, kern.view(c, 1, 1, k), padding=(0, k // 2), groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.smooth(x, self.kernel())


class AnchorSpatialAttention(nn.Module):
    """U-SA: anchor ``a [B,C+1,H,W]`` → spatial attention logits → ``f' = f + (σ(ℓ) − ½)·f``.

    ``ℓ = conv1x1(max(K∗a, a))`` with a learnable Gaussian ``K`` per channel and a bias-free
    1×1 convolution. The paper writes ``f' = σ(ℓ)·f + f``; we drop its anchor-independent part
    ``σ(0)·f = ½·f`` (a constant 1.5× rescale that the next normalisation absorbs), so that
    a zero anchor — "nothing anchored here" — leaves the feature exactly unchanged.

    The anchor channels are the condition model's last decoded feature (``feature_channels``)
    followed by one channel: the prompted organ's anchor probability. :meth:`organ_logits`
    computes the logits for every organ at once (the 1×1 convolution is linear in the
    channels), which is what lets the image-only condition serve every organ prompt.
    """

    def __init__(self, feature_channels: int, kernel_size: int = 7, sigma: float = 1.5):
        super().__init__()
        self.feature_channels = int(feature_channels)
        self.blur = LearnableGaussianBlur(self.feature_channels + 1, kernel_size, sigma)
        self.reduce = nn.Conv2d(self.feature_channels + 1, 1, 1, bias=False)

    def logits(self, anchor: torch.Tensor) -> torch.Tensor:
        """``[B,C+1,H,W]`` → attention logits ``[B,1,H,W]``."""
        return self.reduce(torch.maximum(self.blur(anchor), anchor))

    def organ_logits(self, features: torch.Tensor, organ_probs: torch.Tensor) -> torch.Tensor:
        """Logits ``[B,O,H,W]``: organ ``o`` gets :meth:`logits` of ``features ⊕ organ_probs[:, o]``."""
        c = self.feature_channels
        kern = self.blur.kernel()
        w = self.reduce.weight.view(-1)
        feat = torch.maximum(self.blur.smooth(features, kern[:c]), features)
        shared = F.conv2d(feat, self.reduce.weight[:, :c])  # [B,1,H,W]
        o = organ_probs.shape[1]
        probs = torch.maximum(self.blur.smooth(organ_probs, kern[c:].expand(o, -1)), organ_probs)
        return shared + w[c].to(probs.dtype) * probs

    @staticmethod
    def modulate(feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Apply attention logits ``[B,1,H,W]`` to ``feature [B,C,H,W]``."""
        return feature + (torch.sigmoid(logits).to(feature.dtype) - 0.5) * feature

    def forward(self, feature: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return self.modulate(feature, self.logits(anchor))


# -- semantic condition: SS-Former -----------------------------------------------------------------


def _channel_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over the channel axis of ``[B,C,H,W]`` at every position (no affine)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],)).permute(0, 3, 1, 2)


def frequency_grid(h: int, w: int, device=None) -> torch.Tensor:
    """Coordinates ``[2,h,w//2+1]`` of the ``rfft2`` bins of an ``h×w`` map: (fy, fx) in cycles/pixel × 2, in [-1, 1]."""
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float32) * 2
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float32) * 2
    return torch.stack(torch.meshgrid(fy, fx, indexing="ij"))


class NeuralBandPassFilter(nn.Module):
    """Frequency coordinates + timestep embedding → filter ``[B, out, h, w//2+1]`` in (0, 1).

    ``blocks`` × (1×1 conv → layer norm → ``(1 + scale(temb))·x + shift(temb)`` → SiLU), then a
    1×1 conv and a sigmoid. The scale/shift projections are ordinarily initialised, so even an
    untrained filter depends on the timestep.
    """

    def __init__(self, out_channels: int, temb_dim: int, width: int = 32, blocks: int = 6):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"filter_blocks must be >= 1, got {blocks}")
        width = int(width)
        self.convs = nn.ModuleList([nn.Conv2d(2 if i == 0 else width, width, 1) for i in range(int(blocks))])
        self.modulations = nn.ModuleList([nn.Linear(int(temb_dim), 2 * width) for _ in range(int(blocks))])
        self.out = nn.Conv2d(width, int(out_channels), 1)

    def forward(self, temb: torch.Tensor, h: int, w: int) -> torch.Tensor:
        temb = temb.to(torch.float32)
        x = frequency_grid(h, w, temb.device)[None].expand(temb.shape[0], -1, -1, -1)
        act = F.silu(temb)
        for conv, mod in zip(self.convs, self.modulations):
            scale, shift = mod(act)[:, :, None, None].chunk(2, dim=1)
            x = F.silu(_channel_layer_norm(conv(x)) * (1 + scale) + shift)
        return torch.sigmoid(self.out(x))


def _rfft_weights(w: int, device) -> torch.Tensor:
    """How often each ``rfft`` column appears in the full spectrum (1 for DC and Nyquist, else 2)."""
    wt = torch.full((w // 2 + 1,), 2.0, device=device)
    wt[0] = 1.0
    if w % 2 == 0:
        wt[-1] = 1.0
    return wt


def spectral_affinity(q: torch.Tensor, k: torch.Tensor, band: torch.Tensor, heads: int,
                      eps: float = 1e-6) -> torch.Tensor:
    """Cosine affinity ``[B,heads,d,d]`` between the query and key channels of each head, in Fourier space.

    ``q``, ``k``: ``[B,C,h,w]`` (``C = heads·d``); ``band``: ``[B,heads,h,w//2+1]`` in [0, 1],
    extended to the full spectrum by Hermitian symmetry. Entry ``(i, j)`` is
    ``Σ_f band(f)·Q̂_i(f)·conj(K̂_j(f))`` — the inverse transform, at displacement 0, of the
    filtered cross-spectrum, i.e. the inner product of the two band-passed maps — divided by the
    band-weighted norms of ``Q̂_i`` and ``K̂_j``, so it lies in [-1, 1]. With ``band ≡ 1`` it is
    the cosine similarity of the spatial maps (Parseval). Computed in float32.
    """
    b, c, h, w = q.shape
    if k.shape != q.shape:
        raise ValueError(f"query {list(q.shape)} and key {list(k.shape)} must have the same shape")
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    qf = torch.fft.rfft2(q.to(torch.float32), norm="ortho").reshape(b, heads, c // heads, -1)
    kf = torch.fft.rfft2(k.to(torch.float32), norm="ortho").reshape(b, heads, c // heads, -1)
    weight = (band.to(torch.float32) * _rfft_weights(w, q.device)).reshape(b, heads, 1, -1)
    qw = qf * weight
    dot = torch.einsum("bhif,bhjf->bhij", qw, kf.conj()).real
    q_norm = (qw * qf.conj()).real.sum(-1).clamp(min=0).sqrt()
    k_norm = ((kf * kf.conj()).real * weight).sum(-1).clamp(min=0).sqrt()
    return dot / (q_norm[..., :, None] * k_norm[..., None, :] + eps)


class SpectralCrossAttention(nn.Module):
    """``x`` attends to ``y`` (same shape ``[B,C,h,w]``) with a timestep-dependent spectral affinity.

    ``x ← x + proj(softmax(τ·A(q(x), k(y))) · v(y))``; ``x ← x + MLP(x)`` (pre-norm). ``A`` is
    :func:`spectral_affinity` with the band-pass filter of ``temb``; ``τ`` a learned per-head
    temperature. Attention runs over channels (transposed attention): each output channel is a
    mixture of the value maps, so the spatial layout of the embeddings is kept.
    """

    def __init__(self, channels: int, heads: int, temb_dim: int, filter_width: int = 32, filter_blocks: int = 6,
                 mlp_ratio: float = 2.0, norm_groups: int = 8):
        super().__init__()
        channels, heads = int(channels), int(heads)
        if heads < 1 or channels % heads:
            raise ValueError(f"ssformer_heads ({heads}) must divide the bottleneck width ({channels})")
        self.heads = heads
        self.norm_x = group_norm(channels, norm_groups)
        self.norm_y = group_norm(channels, norm_groups)
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.to_k = nn.Conv2d(channels, channels, 1)
        self.to_v = nn.Conv2d(channels, channels, 1)
        self.log_temperature = nn.Parameter(torch.full((heads,), 0.5 * math.log(channels // heads)))
        self.band_pass = NeuralBandPassFilter(heads, temb_dim, filter_width, filter_blocks)
        self.proj = nn.Conv2d(channels, channels, 1)
        hidden = max(1, int(round(channels * float(mlp_ratio))))
        self.norm_mlp = group_norm(channels, norm_groups)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, channels, 1))

    def attention(self, x: torch.Tensor, y: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B,heads,d,d]`` (rows: query channels of ``x``, soft-maxed over ``y``'s)."""
        q, k = self.to_q(self.norm_x(x)), self.to_k(self.norm_y(y))
        band = self.band_pass(temb, x.shape[-2], x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            affinity = spectral_affinity(q, k, band, self.heads)
            tau = self.log_temperature.to(torch.float32).clamp(max=math.log(100.0)).exp()
            return torch.softmax(affinity * tau[None, :, None, None], dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"SS-Former inputs must have the same shape, got {list(x.shape)} and {list(y.shape)}")
        b, c, h, w = x.shape
        attn = self.attention(x, y, temb)
        v = self.to_v(self.norm_y(y)).reshape(b, self.heads, c // self.heads, h * w)
        out = torch.matmul(attn.to(v.dtype), v).reshape(b, c, h, w)
        x = x + self.proj(out)
        return x + self.mlp(self.norm_mlp(x))


class SSFormerBlock(nn.Module):
    """Two symmetric spectral cross-attention modules: condition ← diffusion, then diffusion ← condition."""

    def __init__(self, channels: int, heads: int, temb_dim: int, filter_width: int, filter_blocks: int,
                 mlp_ratio: float, norm_groups: int):
        super().__init__()
        args = (channels, heads, temb_dim, filter_width, filter_blocks, mlp_ratio, norm_groups)
        self.to_condition = SpectralCrossAttention(*args)
        self.to_diffusion = SpectralCrossAttention(*args)

    def forward(self, e: torch.Tensor, c: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.to_condition(c, e, temb)
        e = self.to_diffusion(e, c, temb)
        return e, c


class SSFormer(nn.Module):
    """``depth`` SS-Former blocks: diffusion embedding ``e`` and condition embedding ``c`` (same shape) → new ``e``.

    The condition embedding is updated inside every block (each module's output feeds the
    next), so every parameter takes part in the result.
    """

    def __init__(self, channels: int, depth: int = 4, heads: int = 4, temb_dim: int = 128, filter_width: int = 32,
                 filter_blocks: int = 6, mlp_ratio: float = 2.0, norm_groups: int = 8):
        super().__init__()
        if depth < 1:
            raise ValueError(f"ssformer_depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList([
            SSFormerBlock(channels, heads, temb_dim, filter_width, filter_blocks, mlp_ratio, norm_groups)
            for _ in range(int(depth))
        ])

    def forward(self, e: torch.Tensor, c: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            e, c = block(e, c, temb)
        return e


# -- diffusion model -------------------------------------------------------------------------------


class TimeResBlock(nn.Module):
    """Residual block whose second normalisation is scaled and shifted by the timestep embedding."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, norm_groups: int = 8):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(temb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class DiffusionUNet(nn.Module):
    """``(x_t [B,1,H,W], t [B], organ_ids [B], anchor_logits [B,1,H,W], semantic [B,S,h,w]) → ε̂ [B,1,H,W]``.

    ``channels[i]`` is the width at ``H/2^i``; ``res_blocks[i]`` the residual blocks of level
    ``i`` in the encoder and again in the decoder (0 is allowed: at full resolution, where
    convolutions cost most, the level is then just the stem, the skip and the output head).
    A stride-2 3×3 convolution goes down a level; going up is a 1×1 convolution at the coarse
    resolution and a nearest ×2 upsampling, concatenated with the skip. U-SA
    (:meth:`AnchorSpatialAttention.modulate`) rescales the stem's output, the first feature of
    the encoder; the SS-Former fuses ``semantic`` (``S = channels[-1]``, at the bottleneck size)
    into the bottleneck between two residual blocks. The organ prompt is a class embedding
    added to the timestep embedding.
    """

    def __init__(self, channels: Sequence[int], res_blocks: Sequence[int], num_organs: int, temb_dim: int = 128,
                 norm_groups: int = 8, ssformer_depth: int = 4, ssformer_heads: int = 4, ssformer_mlp_ratio: float = 2.0,
                 filter_width: int = 32, filter_blocks: int = 6):
        super().__init__()
        channels = _int_list("unet_channels", channels)
        res_blocks = _int_list("unet_res_blocks", res_blocks, len(channels), minimum=0)
        self.levels = len(channels)
        self.temb_dim = int(temb_dim)
        self.time_mlp = nn.Sequential(nn.Linear(self.temb_dim, self.temb_dim), nn.SiLU(),
                                      nn.Linear(self.temb_dim, self.temb_dim))
        self.class_embedding = nn.Embedding(int(num_organs), self.temb_dim)
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1)
        self.encoder = nn.ModuleList()
        self.down = nn.ModuleList()
        for i, c in enumerate(channels):
            self.encoder.append(nn.ModuleList([TimeResBlock(c, c, self.temb_dim, norm_groups)
                                               for _ in range(res_blocks[i])]))
            if i < self.levels - 1:
                self.down.append(nn.Conv2d(c, channels[i + 1], 3, stride=2, padding=1))
        bottleneck = channels[-1]
        self.mid1 = TimeResBlock(bottleneck, bottleneck, self.temb_dim, norm_groups)
        self.ssformer = SSFormer(bottleneck, ssformer_depth, ssformer_heads, self.temb_dim, filter_width,
                                 filter_blocks, ssformer_mlp_ratio, norm_groups)
        self.mid2 = TimeResBlock(bottleneck, bottleneck, self.temb_dim, norm_groups)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(self.levels - 1):  # decoder level i receives level i+1 upsampled
            c = channels[i]
            self.up.append(nn.Sequential(nn.Conv2d(channels[i + 1], c, 1), nn.Upsample(scale_factor=2, mode="nearest")))
            if res_blocks[i] == 0:
                self.decoder.append(nn.ModuleList([nn.Conv2d(2 * c, c, 1)]))
            else:
                self.decoder.append(nn.ModuleList([TimeResBlock(2 * c if j == 0 else c, c, self.temb_dim, norm_groups)
                                                   for j in range(res_blocks[i])]))
        self.out = nn.Sequential(group_norm(channels[0], norm_groups), nn.SiLU(), nn.Conv2d(channels[0], 1, 3, padding=1))
        self.semantic_channels = bottleneck
        self.size_multiple = 2 ** (self.levels - 1)

    def bottleneck_size(self, h: int, w: int) -> tuple[int, int]:
        return h // self.size_multiple, w // self.size_multiple

    def time_embedding(self, t: torch.Tensor, organ_ids: torch.Tensor) -> torch.Tensor:
        """Timestep embedding plus the organ's class embedding ``[B, temb_dim]``."""
        emb = self.time_mlp(timestep_embedding(t, self.temb_dim).to(self.class_embedding.weight.dtype))
        return emb + self.class_embedding(organ_ids.long())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, organ_ids: torch.Tensor, anchor_logits: torch.Tensor,
                semantic: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t, organ_ids)
        h = AnchorSpatialAttention.modulate(self.stem(x_t), anchor_logits)
        skips = []
        for i, blocks in enumerate(self.encoder):
            for block in blocks:
                h = block(h, temb)
            if i < self.levels - 1:
                skips.append(h)
                h = self.down[i](h)
        h = self.mid1(h, temb)
        h = self.ssformer(h, semantic.to(h.dtype), temb)
        h = self.mid2(h, temb)
        for i in reversed(range(self.levels - 1)):
            h = torch.cat([self.up[i](h), skips[i]], dim=1)
            for block in self.decoder[i]:
                h = block(h, temb) if isinstance(block, TimeResBlock) else block(h)
        return self.out(h)
