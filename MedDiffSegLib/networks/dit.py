"""Diffusion transformers on a latent grid: a DiT noise predictor and a Control DiT beside it.

Written here rather than taken from diffusers, whose ``DiTTransformer2DModel`` has no way to
add control residuals between its blocks.

- :class:`DiT` — patchify the latent (a ``p×p`` strided convolution) into tokens, add fixed 2D
  sine-cosine positions, run ``depth`` :class:`DiTBlock` s, then a final adaLN layer and
  unpatchify back to the latent's shape. Each block is modulated by adaLN (shift, scale and a
  residual gate per branch) computed from one conditioning vector: the timestep embedding plus
  a learned class-label (organ) embedding. ``forward`` optionally takes one control residual
  per block, added to the residual stream right after the matching block.
- :class:`ControlDiT` — ``K`` DiT blocks of its own (own timestep and organ embeddings) reading
  ``[z_t ⊕ zero_conv(condition)]``; block ``k``'s output goes through a zero-initialised
  linear projection and becomes the residual for DiT block ``k``. Both the convolution on the
  condition and the projections start at exactly zero, so an untrained control branch adds
  exact zeros and the DiT's output is unchanged bit for bit.
- :class:`ControlledDiT` — the two together: ``(z_t, t, condition, labels) -> prediction``.

``adaln_zero=True`` is the DiT initialisation (every block's adaLN projection and the final
layer start at zero, so each block is the identity and the model predicts 0); ``False`` keeps
PyTorch's default initialisation there, so that a randomly initialised test model reacts to
its inputs. The control projections and the condition convolution are zero either way.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

#: Size of the sinusoidal timestep features fed to the timestep MLP.
TIMESTEP_FEATURES = 256


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` (float32) of (possibly fractional) timesteps ``t[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


@functools.lru_cache(maxsize=32)
def _sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2D positions ``[grid_h·grid_w, dim]``: half the channels code the row, half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
    r = rows.reshape(-1, 1) * omega[None]
    c = cols.reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(r), torch.cos(r), torch.sin(c), torch.cos(c)], dim=1).to(torch.float32)


def sincos_positions(grid_h: int, grid_w: int, dim: int, device, dtype) -> torch.Tensor:
    return _sincos_2d(int(grid_h), int(grid_w), int(dim)).to(device=device, dtype=dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (in place) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def check_shape(width: int, heads: int, patch_size: int) -> None:
    if width < 4 or width % 4:
        raise ValueError(f"DiT width must be a positive multiple of 4 (2D sine-cosine positions), got {width}")
    if heads < 1 or width % heads:
        raise ValueError(f"DiT width {width} must be divisible by the number of heads {heads}")
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")


class ConditionEmbedding(nn.Module):
    """Timestep MLP (on sinusoidal features) plus a class-label embedding: one vector ``[B, width]``."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.timestep_mlp = nn.Sequential(nn.Linear(TIMESTEP_FEATURES, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(int(num_classes), width)

    def forward(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.timestep_mlp[0].weight
        feats = timestep_embedding(t.reshape(-1), TIMESTEP_FEATURES).to(device=w.device, dtype=w.dtype)
        return self.timestep_mlp(feats) + self.label(labels.long()).to(w.dtype)


class PatchEmbed(nn.Module):
    """``[B,C,H,W] -> [B, (H/p)(W/p), width]`` tokens with fixed 2D positions added."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_channels, width, self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent {x.shape[-2]}×{x.shape[-1]} is not divisible by the patch size {p}")
        h = self.proj(x)
        gh, gw = h.shape[-2:]
        tokens = h.flatten(2).transpose(1, 2)
        return tokens + sincos_positions(gh, gw, tokens.shape[-1], tokens.device, tokens.dtype)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = int(heads)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-norm transformer block (self-attention, MLP) with adaLN shift/scale/gate per branch."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, adaln_zero: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = max(1, int(round(width * float(mlp_ratio))))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        if adaln_zero:
            zero_module(self.adaln[1])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN → linear to ``p·p·C`` values per token."""

    def __init__(self, width: int, patch_size: int, out_channels: int, adaln_zero: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        if adaln_zero:
            zero_module(self.adaln[1])
            zero_module(self.linear)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch_size: int, channels: int) -> torch.Tensor:
    """``[B, gh·gw, p·p·C] -> [B, C, gh·p, gw·p]``: token (i, j) fills pixels ``[i·p:(i+1)·p, j·p:(j+1)·p]``."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(b, grid_h, grid_w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid_h * p, grid_w * p)


class DiT(nn.Module):
    """Class-conditional diffusion transformer ``(x[B,C,h,w], t[B], labels[B]) -> [B,C_out,h,w]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_classes: int,
        width: int = 192,
        depth: int = 6,
        heads: int = 6,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        adaln_zero: bool = True,
    ):
        super().__init__()
        width, depth, heads, patch_size = int(width), int(depth), int(heads), int(patch_size)
        check_shape(width, heads, patch_size)
        if depth < 1:
            raise ValueError(f"DiT depth must be >= 1, got {depth}")
        self.patch_size, self.out_channels = patch_size, int(out_channels)
        self.patch_embed = PatchEmbed(in_channels, width, patch_size)
        self.embed = ConditionEmbedding(width, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, adaln_zero) for _ in range(depth))
        self.final = FinalLayer(width, patch_size, self.out_channels, adaln_zero)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``control[k]`` (tokens ``[B, L, width]``) is added to the residual stream after block ``k``."""
        control = control or []
        if len(control) > len(self.blocks):
            raise ValueError(f"{len(control)} control residuals for a DiT of {len(self.blocks)} blocks")
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        h = self.patch_embed(x)
        c = self.embed(t, labels)
        for k, block in enumerate(self.blocks):
            h = block(h, c)
            if k < len(control):
                h = h + control[k].to(h.dtype)
        return unpatchify(self.final(h, c), gh, gw, self.patch_size, self.out_channels)


class ControlDiT(nn.Module):
    """``K`` DiT blocks reading ``[x ⊕ zero_conv(condition)]``; returns ``K`` zero-projected residuals."""

    def __init__(
        self,
        in_channels: int,
        cond_channels: int,
        num_classes: int,
        width: int = 192,
        depth: int = 3,
        heads: int = 6,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        adaln_zero: bool = True,
        out_width: int | None = None,
    ):
        super().__init__()
        width, depth, heads, patch_size = int(width), int(depth), int(heads), int(patch_size)
        check_shape(width, heads, patch_size)
        if depth < 1:
            raise ValueError(f"Control DiT depth must be >= 1, got {depth}")
        out_width = width if out_width is None else int(out_width)
        self.cond_zero_conv = zero_module(nn.Conv2d(cond_channels, cond_channels, 1))
        self.patch_embed = PatchEmbed(in_channels + cond_channels, width, patch_size)
        self.embed = ConditionEmbedding(width, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, adaln_zero) for _ in range(depth))
        self.zero_proj = nn.ModuleList(zero_module(nn.Linear(width, out_width)) for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        u = torch.cat([x, self.cond_zero_conv(cond.to(x.dtype))], dim=1)
        h = self.patch_embed(u)
        c = self.embed(t, labels)
        residuals = []
        for block, proj in zip(self.blocks, self.zero_proj):
            h = block(h, c)
            residuals.append(proj(h))
        return residuals


class ControlledDiT(nn.Module):
    """A DiT noise predictor of ``depth`` blocks with a Control DiT of ``control_depth`` blocks beside it.

    ``forward(z_t, t, cond, labels)``: the DiT sees ``z_t`` (and ``t``, ``labels``); the Control
    DiT sees ``z_t ⊕ zero_conv(cond)`` and adds its residuals after the first ``control_depth``
    DiT blocks. ``use_control=False`` runs the plain DiT.
    """

    def __init__(
        self,
        latent_channels: int,
        cond_channels: int,
        num_classes: int,
        width: int = 192,
        depth: int = 6,
        control_depth: int = 3,
        heads: int = 6,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        adaln_zero: bool = True,
    ):
        super().__init__()
        if not 1 <= int(control_depth) <= int(depth):
            raise ValueError(f"control_depth must be in [1, depth={depth}], got {control_depth}")
        self.patch_size = int(patch_size)
        self.dit = DiT(latent_channels, latent_channels, num_classes, width, depth, heads, patch_size, mlp_ratio,
                       adaln_zero)
        self.control = ControlDiT(latent_channels, cond_channels, num_classes, width, control_depth, heads, patch_size,
                                  mlp_ratio, adaln_zero, out_width=width)

    def forward(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, labels: torch.Tensor, use_control: bool = True
    ) -> torch.Tensor:
        residuals = self.control(z_t, cond, t, labels) if use_control else None
        return self.dit(z_t, t, labels, residuals)
