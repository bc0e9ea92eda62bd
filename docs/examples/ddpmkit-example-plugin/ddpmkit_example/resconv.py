"""``resconv``: a small residual ConvNet denoiser, an alternative to the built-in UNet.

It keeps the image's resolution throughout (no down- or up-sampling), so it works for any
image shape (C, H, W): an input 3x3 conv, ``num_blocks`` residual blocks, each told the time
step through a learned projection of a shared time embedding, and an output 3x3 conv.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from ddpmkit.interfaces import Denoiser


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The transformer's sinusoidal encoding of integer steps ``t`` [B] as [B, dim] (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x))) + time projection)))."""

    def __init__(self, channels: int, num_groups: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.time = nn.Linear(time_dim, channels)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return x + h


class ResConv(Denoiser):
    """Input conv, ``num_blocks`` residual blocks of ``channels`` channels, output conv; predicts epsilon."""

    class Options(Denoiser.Options):
        channels: int = Field(32, ge=1, description="channels of every residual block")
        num_blocks: int = Field(4, ge=1, description="number of residual blocks")
        num_groups: int = Field(8, ge=1, description="GroupNorm groups; channels must divide by it")

        @model_validator(mode="after")
        def _groups(self) -> ResConv.Options:
            if self.channels % self.num_groups:
                raise ValueError(f"channels ({self.channels}) must be divisible by num_groups ({self.num_groups})")
            return self

    def __init__(
        self,
        options: ResConv.Options | None = None,
        *,
        image_shape: tuple[int, int, int],
        num_timesteps: int,
    ) -> None:
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps)
        o = self.options
        image_channels = self.image_shape[0]
        self.freq_dim = o.channels + o.channels % 2  # the sinusoidal encoding needs an even width
        time_dim = 4 * o.channels
        self.time_mlp = nn.Sequential(nn.Linear(self.freq_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input_conv = nn.Conv2d(image_channels, o.channels, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(o.channels, o.num_groups, time_dim) for _ in range(o.num_blocks))
        self.output = nn.Sequential(
            nn.GroupNorm(o.num_groups, o.channels),
            nn.SiLU(),
            nn.Conv2d(o.channels, image_channels, kernel_size=3, padding=1),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t, self.freq_dim).to(x_t.dtype))
        x = self.input_conv(x_t)
        for block in self.blocks:
            x = block(x, emb)
        return self.output(x)
