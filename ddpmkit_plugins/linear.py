"""The linear beta schedule of Ho et al. (2020), section 4: beta_1 = 1e-4 ... beta_T = 0.02."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from ddpmkit.interfaces import NoiseSchedule


class LinearSchedule(NoiseSchedule):
    """Betas spaced linearly from ``beta_start`` to ``beta_end`` over T steps."""

    class Options(NoiseSchedule.Options):
        beta_start: float = Field(1e-4, gt=0, lt=1, description="beta at the first step")
        beta_end: float = Field(0.02, gt=0, lt=1, description="beta at the last step")

        @model_validator(mode="after")
        def _increasing(self) -> LinearSchedule.Options:
            if self.beta_end <= self.beta_start:
                raise ValueError(
                    f"betas must increase: beta_end ({self.beta_end}) must be greater than beta_start "
                    f"({self.beta_start})"
                )
            return self

    def make_betas(self) -> torch.Tensor:
        o = self.options
        return torch.linspace(o.beta_start, o.beta_end, o.num_timesteps, dtype=torch.float64)
