"""The cosine schedule of Nichol & Dhariwal (2021), eq. 17, with beta capped at 0.999."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ddpmkit.interfaces import NoiseSchedule


class CosineSchedule(NoiseSchedule):
    """abar(t) = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2); beta_t = min(1 - abar_t / abar_{t-1},
    max_beta)."""

    class Options(NoiseSchedule.Options):
        offset: float = Field(0.008, gt=0, lt=1, description="s in eq. 17: keeps beta small near t = 0")
        max_beta: float = Field(0.999, gt=0, lt=1, description="cap on beta_t near t = T (the paper's 0.999)")

    def make_betas(self) -> torch.Tensor:
        o = self.options
        t = torch.arange(o.num_timesteps + 1, dtype=torch.float64) / o.num_timesteps
        f = torch.cos((t + o.offset) / (1 + o.offset) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=o.max_beta)
