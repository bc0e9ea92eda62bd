"""DDIM sampling (Song et al. 2021): a few steps of the generalised reverse process, deterministic at eta = 0."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ddpmkit.diffusion import ReverseStep, ddim_sigma
from ddpmkit.errors import ConfigError
from ddpmkit.interfaces import NoiseSchedule, ReverseStepSampler


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str) -> list[int]:
    """``steps`` of 0..T-1, noisiest first: ``linspace`` (ends included), ``leading`` (0, k, 2k, ...) or
    ``trailing`` (T-1, T-1-k, ...), with k = T / steps (Lin et al. 2024, table 2)."""
    T = num_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round().astype(int)
    elif spacing == "leading":
        ts = np.arange(steps) * (T // steps)
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / steps)).astype(int) - 1
    return sorted({int(t) for t in ts}, reverse=True)


class DDIMSampler(ReverseStepSampler):
    """x_{t_prev} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (eq. 12), sigma from eta (eq.
    16)."""

    class Options(ReverseStepSampler.Options):
        steps: int = Field(50, ge=1, description="number of denoiser evaluations (at most T)")
        eta: float = Field(0.0, ge=0, le=1, description="0: deterministic DDIM; 1: the DDPM posterior variance")
        spacing: Literal["linspace", "leading", "trailing"] = Field(
            "leading", description="how the steps are spread over 0..T-1"
        )
        clip_denoised: bool = Field(False, description="clip the estimate of x_0 to [-1, 1] at every step")

    def reverse_steps(self, schedule: NoiseSchedule) -> list[ReverseStep]:
        o = self.options
        T = schedule.num_timesteps
        if o.steps > T:
            raise ConfigError(f"sampler.options.steps: {o.steps} steps exceed the schedule's T = {T}")
        ts = spaced_timesteps(T, o.steps, o.spacing)
        steps = []
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            sigma = ddim_sigma(schedule, t, t_prev, o.eta)
            steps.append(ReverseStep(t, t_prev, sigma, sigma))
        return steps
