"""The prompt encoder: a user's clicks, box and previous mask → an addition to the image latent.

Interactive correction gives a method per-organ condition maps beside the image (see
:mod:`MedDiffSegLib.interactive.prompts` for what each channel holds). They are encoded to the
latent grid by a small strided convolution stack and **added** to the image latent of the
prompted organ's rows, so the image is still encoded once per window and the prompts cost one
small network per organ row.

Two properties make one model serve both the automatic and the interactive segmentation:

- **No prompt is exactly nothing.** Every layer is bias-free and every activation maps 0 to 0,
  so an all-zero prompt (no click, no box, no previous mask) encodes to an all-zero latent and
  the automatic path is bit-for-bit the path with ``prompts=None``.
- **Zero-initialised output** (as ControlNet's zero convolutions): a model that gains the
  encoder starts exactly as the automatic model it was fine-tuned from, and learns to use the
  prompts from there.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """``[B,P,H,W] -> [B,C,H/8,W/8]``: three bias-free stride-2 convolutions with SiLU, a zero 1×1 head."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"PromptEncoder: channels must be 3 positive widths (at /2, /4, /8), got {channels}")
        layers: list[nn.Module] = []
        prev = int(in_channels)
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, stride=2, padding=1, bias=False), nn.SiLU()]
            prev = c
        self.stages = nn.Sequential(*layers)
        self.head = nn.Conv2d(prev, int(out_channels), 1, bias=False)
        nn.init.zeros_(self.head.weight)

    @property
    def in_channels(self) -> int:
        return int(self.stages[0].in_channels)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(prompts))
