"""The forward process and the training objective of Ho et al. (2020), written against NoiseSchedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interfaces import Denoiser, NoiseSchedule


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values[t].view(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (
        _per_sample(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + _per_sample(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def training_loss(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """eq. 14, the simplified objective: || eps - eps_theta(x_t, t) ||^2, averaged over all elements."""
    prediction = denoiser(q_sample(schedule, x0, t, noise), t)
    return F.mse_loss(prediction.float(), noise)


def draw_training_batch_noise(
    batch_size: int, shape: tuple[int, ...], num_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """t uniform in [0, T) and eps ~ N(0, I) for one batch, both from ``generator`` (on its device)."""
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=generator.device)
    noise = torch.randn((batch_size, *shape), generator=generator, device=generator.device)
    return t, noise
