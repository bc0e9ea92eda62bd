"""Ancestral sampling of Ho et al. (2020), Algorithm 2, batched and on the denoiser's device."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ddpmkit.diffusion import ReverseStep, ancestral_steps
from ddpmkit.interfaces import NoiseSchedule, ReverseStepSampler


class DDPMSampler(ReverseStepSampler):
    """x_{t-1} = mu-tilde_t(x_t, x_0) + sigma_t z for t = T-1 ... 0, from x_T ~ N(0, I); the last step adds no noise.

    (x_0, eps) come from the denoiser through ddpmkit.diffusion, whatever its prediction target.
    """

    class Options(ReverseStepSampler.Options):
        variance: Literal["beta", "posterior"] = Field(
            "beta", description="sigma_t^2 = beta_t (the tutorial's choice) or the posterior beta-tilde_t (eq. 7)"
        )
        clip_denoised: bool = Field(False, description="clip the estimate of x_0 to [-1, 1] at every step")

    def reverse_steps(self, schedule: NoiseSchedule) -> list[ReverseStep]:
        return ancestral_steps(schedule, self.options.variance)
