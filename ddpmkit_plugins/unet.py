"""The attention UNet of the tutorial (after Ho et al. 2020, appendix B), with its defects fixed.

Fixes: the time-embedding table is a buffer (follows ``.to(device)``), attention dropout is off
in eval mode, and the input/output channel count follows the image shape. Dropout (in the ResBlocks and on the
attention weights) is :mod:`ddpmkit.runtime.dropout`'s: ``F.dropout`` itself, except inside a compiled CPU graph.

Option ``time_embedding = "mlp"`` replaces the tutorial's fixed sinusoid (added as is to every
block) with the conditioning of Ho et al. 2020 (appendix B): a learned two-layer MLP on the
sinusoid and, in every ResBlock, a learned projection to that block's channels.

Class-conditional (plugin API 3), as the usual recipes (improved-diffusion, DiT) do: a learned embedding
of the class, with one more row for the null class, added to the time embedding that every block takes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from ddpmkit.diffusion import NULL_CLASS, Cond
from ddpmkit.errors import ConfigError
from ddpmkit.interfaces import Denoiser
from ddpmkit.runtime.dropout import attention, dropout
from ddpmkit.runtime.limits import check_fits


class SinusoidalEmbedding(nn.Module):
    """The transformer's sinusoidal position table over t = 0..T-1, as [B, D, 1, 1]; a float t (continuous time,
    plugin API 4) gets the same sinusoid computed at t."""

    def __init__(self, num_timesteps: int, dim: int) -> None:
        super().__init__()
        position = torch.arange(num_timesteps, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
        table = torch.zeros(num_timesteps, dim)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("div", div, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return self.table[t][:, :, None, None]
        angle = t.float()[:, None] * self.div
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :, None, None]


class TimeMLP(nn.Module):
    """Linear, SiLU, linear on the sinusoid: the learned time embedding of Ho et al. 2020."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb[:, :, 0, 0])[:, :, None, None]


class ResBlock(nn.Module):
    """GroupNorm, ReLU, 3x3 conv, dropout, GroupNorm, ReLU, 3x3 conv, plus the input; time added first.

    With ``emb_dim`` the time embedding goes through a learned SiLU + linear projection to the
    block's channels; without it, its first ``channels`` entries are added as they are (the tutorial).
    """

    def __init__(self, channels: int, num_groups: int, dropout: float, emb_dim: int | None = None) -> None:
        super().__init__()
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Conv2d(emb_dim, channels, 1)) if emb_dim else None
        self.gnorm1 = nn.GroupNorm(num_groups, channels)
        self.gnorm2 = nn.GroupNorm(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = x + (self.time_proj(emb) if self.time_proj is not None else emb[:, : x.shape[1]])
        r = self.conv1(F.relu(self.gnorm1(x)))
        r = dropout(r, self.dropout, self.training)
        r = self.conv2(F.relu(self.gnorm2(r)))
        return r + x


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (qkv projection, SDPA, output projection)."""

    def __init__(self, channels: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.proj1 = nn.Linear(channels, channels * 3)
        self.proj2 = nn.Linear(channels, channels)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = rearrange(x, "b c h w -> b (h w) c")
        q, k, v = rearrange(self.proj1(x), "b L (C H K) -> K b H L C", K=3, H=self.num_heads)
        x = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = rearrange(x, "b H (h w) C -> b h w (C H)", h=h, w=w)
        return rearrange(self.proj2(x), "b h w C -> b C h w")


class UNetLayer(nn.Module):
    """ResBlock, optional attention, ResBlock, then a stride-2 conv (x2 channels) or a 4x4 transposed conv (/2)."""

    def __init__(
        self,
        channels: int,
        upscale: bool,
        attention: bool,
        num_groups: int,
        dropout: float,
        num_heads: int,
        emb_dim: int | None = None,
    ):
        super().__init__()
        self.res1 = ResBlock(channels, num_groups, dropout, emb_dim)
        self.attention = Attention(channels, num_heads, dropout) if attention else None
        self.res2 = ResBlock(channels, num_groups, dropout, emb_dim)
        if upscale:
            self.resample = nn.ConvTranspose2d(channels, channels // 2, kernel_size=4, stride=2, padding=1)
        else:
            self.resample = nn.Conv2d(channels, channels * 2, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.res1(x, emb)
        if self.attention is not None:
            x = self.attention(x)
        x = self.res2(x, emb)
        return self.resample(x), x


class UNet(Denoiser):
    """The tutorial's UNet: ~35.2 M parameters with the default options at 1x32x32."""

    conditions = frozenset({"class"})
    continuous_time = True

    class Options(Denoiser.Options):
        prediction: Literal["epsilon", "x0", "v"] = Field(
            "epsilon", description="what the network outputs: the noise, the clean image, or v (Salimans & Ho 2022)"
        )
        time_embedding: Literal["sinusoidal", "mlp"] = Field(
            "sinusoidal",
            description="sinusoidal: the tutorial's fixed table added to every block; "
            "mlp: a learned MLP and per-block projections (Ho et al. 2020)",
        )
        num_groups: int = Field(32, ge=1, description="GroupNorm groups; every channel count must divide by it")
        num_heads: int = Field(8, ge=1, description="attention heads")
        dropout: float = Field(0.1, ge=0, lt=1, description="dropout in ResBlocks and attention (training only)")
        channels: list[int] = Field(
            [64, 128, 256, 512, 512, 384],
            description="channels of each layer: the first half go down, the second half up",
            validate_default=True,  # defaults are checked against the options a user did set
        )
        attentions: list[bool] = Field(
            [False, True, False, False, False, True],
            description="self-attention in each layer",
            validate_default=True,  # defaults are checked against the options a user did set
        )
        upscales: list[bool] = Field(
            [False, False, False, True, True, True],
            description="False for a down layer, True for an up layer",
            validate_default=True,  # defaults are checked against the options a user did set
        )

        @field_validator("channels")
        @classmethod
        def _channels(cls, channels: list[int], info: ValidationInfo) -> list[int]:
            n = len(channels)
            if n < 2 or n % 2:
                raise ValueError(f"needs an even number (>= 2) of layers, got {n}")
            if any(c < 1 for c in channels):
                raise ValueError("channel counts must be positive")
            groups, heads = info.data.get("num_groups"), info.data.get("num_heads")
            for i, c in enumerate(channels):
                if groups and c % groups:
                    raise ValueError(f"channels[{i}] = {c} is not divisible by num_groups = {groups}")
                if heads and channels[i] % heads:
                    raise ValueError(f"channels[{i}] = {c} is not divisible by num_heads = {heads}")
            half = n // 2
            for i in range(half):  # each down layer doubles the channels for the next
                if channels[i + 1] != 2 * channels[i]:
                    raise ValueError(f"channels[{i + 1}] must be {2 * channels[i]} (twice channels[{i}])")
            for i in range(half, n - 1):  # each up layer halves, then concatenates the matching skip
                want = channels[i] // 2 + channels[n - 1 - i]
                if channels[i + 1] != want:
                    raise ValueError(
                        f"channels[{i + 1}] must be {want} (channels[{i}] / 2 + the skip's channels[{n - 1 - i}])"
                    )
            if channels[-1] % 2 or (channels[-1] // 2 + channels[0]) % 2:
                raise ValueError("the last layer's channels must keep the output head's widths even")
            return channels

        @field_validator("attentions", "upscales")
        @classmethod
        def _per_layer(cls, flags: list[bool], info: ValidationInfo) -> list[bool]:
            channels = info.data.get("channels")
            if channels is not None and len(flags) != len(channels):
                raise ValueError(f"needs one entry per layer ({len(channels)}), got {len(flags)}")
            if info.field_name == "upscales":
                half = len(flags) // 2
                if flags != [False] * half + [True] * (len(flags) - half):
                    raise ValueError("the first half of the layers must go down (false), the second half up (true)")
            return flags

    def __init__(
        self, options=None, *, image_shape: tuple[int, int, int], num_timesteps: int, num_classes: int = 0
    ) -> None:
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps, num_classes=num_classes)
        o = self.options
        channels_in, height, width = self.image_shape
        factor = 2 ** (len(o.channels) // 2)
        if height % factor or width % factor:
            raise ConfigError(  # a user error (data.image_size vs the layer count): one line, exit code 2
                f"denoiser.options.channels: unet with {len(o.channels)} layers needs image sides divisible by "
                f"{factor} (data.image_size), got {height}x{width}"
            )
        self.shallow_conv = nn.Conv2d(channels_in, o.channels[0], kernel_size=3, padding=1)
        check_fits(
            num_timesteps * max(o.channels) * 4,
            f"unet's time-embedding table for T = {num_timesteps:,}",
            "DDPMs use about 1,000 steps",
        )
        self.embedding = SinusoidalEmbedding(num_timesteps, max(o.channels))
        learned = o.time_embedding == "mlp"
        self.time_mlp = TimeMLP(max(o.channels)) if learned else None
        # row num_classes is the null class (NULL_CLASS): the unconditional model of classifier-free guidance
        self.class_embedding = nn.Embedding(num_classes + 1, max(o.channels)) if num_classes else None
        self.layers = nn.ModuleList(
            UNetLayer(c, up, att, o.num_groups, o.dropout, o.num_heads, max(o.channels) if learned else None)
            for c, up, att in zip(o.channels, o.upscales, o.attentions)
        )
        out_channels = o.channels[-1] // 2 + o.channels[0]
        self.late_conv = nn.Conv2d(out_channels, out_channels // 2, kernel_size=3, padding=1)
        self.output_conv = nn.Conv2d(out_channels // 2, channels_in, kernel_size=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        emb = self.embedding(t)
        if self.time_mlp is not None:
            emb = self.time_mlp(emb)
        if self.class_embedding is not None:
            labels = cond["class"] if cond is not None else torch.full_like(t, NULL_CLASS)
            labels = torch.where(labels == NULL_CLASS, self.num_classes, labels)
            emb = emb + self.class_embedding(labels)[:, :, None, None]
        emb = emb.to(x_t.dtype)
        x = self.shallow_conv(x_t)
        half = len(self.layers) // 2
        skips = []
        for layer in self.layers[:half]:
            x, skip = layer(x, emb)
            skips.append(skip)
        for layer in self.layers[half:]:
            x = torch.cat((layer(x, emb)[0], skips.pop()), dim=1)
        return self.output_conv(F.relu(self.late_conv(x)))
