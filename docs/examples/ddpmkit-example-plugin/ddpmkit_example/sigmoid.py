"""The sigmoid noise schedule.

Jabri, Fleet and Chen (2022), "Scalable Adaptive Computation for Iterative Generation"
(arXiv:2212.11972), and Chen (2023), "On the Importance of Noise Scheduling for Diffusion Models"
(arXiv:2301.10972), Algorithm 1. With t in [0, 1]:

    gamma(t) = (sigmoid(end / tau) - sigmoid((t * (end - start) + start) / tau))
               / (sigmoid(end / tau) - sigmoid(start / tau))

so gamma(0) = 1 and gamma(1) = 0; gamma is the cumulative signal level alpha-bar. For T steps,
alpha-bar_i = gamma(i / T) for i = 0..T, and beta_i = 1 - alpha-bar_i / alpha-bar_{i-1} for
i = 1..T (Nichol and Dhariwal 2021, eq. 17), clipped to [MIN_BETA, MAX_BETA].

Clipping the last beta to MAX_BETA < 1 keeps 1 - beta representable in float32 (the reverse
process divides by its square root), so the final alpha-bar is gamma(1 - 1/T) * (1 - MAX_BETA)
rather than exactly 0.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from ddpmkit.interfaces import NoiseSchedule

#: Smallest beta: keeps every beta strictly positive when gamma is flat (small tau).
MIN_BETA = 1e-8
#: Largest beta, as in Nichol and Dhariwal (2021) for the cosine schedule.
MAX_BETA = 0.999
#: Floor of gamma before taking ratios (Chen 2023, Algorithm 1: clip_min), avoids 0 / 0.
MIN_GAMMA = 1e-9


def _sigmoid(x: float) -> float:
    """The logistic function in float64, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def sigmoid_gamma(t: torch.Tensor, start: float, end: float, tau: float) -> torch.Tensor:
    """gamma(t) of Chen (2023), Algorithm 1, for t in [0, 1], in the dtype of ``t``."""
    v_start, v_end = _sigmoid(start / tau), _sigmoid(end / tau)
    return (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)


class SigmoidSchedule(NoiseSchedule):
    """alpha-bar follows a reversed, rescaled sigmoid; ``start``/``end`` pick its range, ``tau`` its steepness."""

    class Options(NoiseSchedule.Options):
        start: float = Field(-3.0, description="sigmoid input at t = 0")
        end: float = Field(3.0, description="sigmoid input at t = 1")
        tau: float = Field(1.0, gt=0, description="temperature: inputs are divided by it (larger is flatter)")

        @model_validator(mode="after")
        def _range(self) -> SigmoidSchedule.Options:
            if self.start >= self.end:
                raise ValueError(f"start ({self.start}) must be less than end ({self.end})")
            if _sigmoid(self.end / self.tau) - _sigmoid(self.start / self.tau) <= 0:
                raise ValueError(
                    f"sigmoid(start / tau) and sigmoid(end / tau) are equal in float64 "
                    f"(start={self.start}, end={self.end}, tau={self.tau}); bring them closer to 0"
                )
            return self

    def make_betas(self) -> torch.Tensor:
        """beta_1..beta_T from gamma at t = 0, 1/T, ..., 1, in float64."""
        o = self.options
        t = torch.linspace(0.0, 1.0, o.num_timesteps + 1, dtype=torch.float64)
        gamma = sigmoid_gamma(t, o.start, o.end, o.tau).clamp(MIN_GAMMA, 1.0)
        betas = 1.0 - gamma[1:] / gamma[:-1]
        return betas.clamp(MIN_BETA, MAX_BETA)
