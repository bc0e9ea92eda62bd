"""Ancestral sampling of Ho et al. (2020), Algorithm 2, batched and on the denoiser's device."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ddpmkit.interfaces import Denoiser, NoiseSchedule, Sampler, SamplerCallback


class DDPMSampler(Sampler):
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z, from x_T ~ N(0, I); the last step adds no noise."""

    class Options(Sampler.Options):
        variance: Literal["beta", "posterior"] = Field(
            "beta", description="sigma_t^2 = beta_t (the tutorial's choice) or the posterior beta-tilde_t (eq. 7)"
        )
        clip_denoised: bool = Field(
            False, description="clip the implied x_0 to [-1, 1] and use the posterior mean (eq. 7)"
        )

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
        device = _device_of(denoiser)
        s = schedule.to(device)
        noise_device = generator.device
        x = torch.randn(shape, generator=generator, device=noise_device).to(device)
        sigmas = (s.betas if self.options.variance == "beta" else s.posterior_variance).sqrt()
        num_steps = s.num_timesteps
        for index, t in enumerate(reversed(range(num_steps))):
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps = denoiser(x, t_batch).float()
            if self.options.clip_denoised:
                x0 = ((x - s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.sqrt_alphas_cumprod[t]).clamp(-1, 1)
                mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x
            else:
                # eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)
                mean = (x - s.betas[t] / s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.alphas[t].sqrt()
            if t > 0:
                z = torch.randn(shape, generator=generator, device=noise_device).to(device)
                x = mean + sigmas[t] * z
            else:
                x = mean
            if callback is not None:
                callback(index, t, x)
        return x.clamp(-1.0, 1.0)


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
