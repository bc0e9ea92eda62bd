"""Ancestral sampling of Ho et al. (2020), Algorithm 2, batched and on the denoiser's device."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ddpmkit.diffusion import ReverseStep, ancestral_steps, predict_x0_eps, reverse_step
from ddpmkit.interfaces import Denoiser, NoiseSchedule, Sampler, SamplerCallback


class DDPMSampler(Sampler):
    """x_{t-1} = mu-tilde_t(x_t, x_0) + sigma_t z for t = T-1 ... 0, from x_T ~ N(0, I); the last step adds no noise.

    (x_0, eps) come from the denoiser through ddpmkit.diffusion, whatever its prediction target.
    """

    class Options(Sampler.Options):
        variance: Literal["beta", "posterior"] = Field(
            "beta", description="sigma_t^2 = beta_t (the tutorial's choice) or the posterior beta-tilde_t (eq. 7)"
        )
        clip_denoised: bool = Field(False, description="clip the estimate of x_0 to [-1, 1] at every step")

    def reverse_steps(self, schedule: NoiseSchedule) -> list[ReverseStep]:
        return ancestral_steps(schedule, self.options.variance)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator,
        callback: SamplerCallback | None = None,
    ) -> torch.Tensor:
        return run_reverse_steps(self.reverse_steps(schedule), denoiser, schedule, shape, generator=generator,
                                 clip_denoised=self.options.clip_denoised, callback=callback)


def run_reverse_steps(
    steps: list[ReverseStep],
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    clip_denoised: bool,
    callback: SamplerCallback | None,
) -> torch.Tensor:
    """x_T ~ N(0, I), then each step of eq. 12 (Song et al. 2021); returns the last x clipped to [-1, 1]."""
    device = denoiser.device
    s = schedule.to(device)
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    for index, step in enumerate(steps):
        x0, eps = predict_x0_eps(denoiser, s, x, step.t, clip_denoised=clip_denoised)
        z = torch.randn(shape, generator=generator, device=generator.device).to(device) if step.sigma > 0 else None
        x = reverse_step(s, step, x0, eps, z)
        if callback is not None:
            callback(index, step.t, x)
    return x.clamp(-1.0, 1.0)
