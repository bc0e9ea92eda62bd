"""A schedule given as its betas: what a diffusers scheduler's ``trained_betas`` holds (and ddpmkit's export
writes), so any process can be loaded exactly."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from ddpmkit.interfaces import NoiseSchedule


class GivenBetas(NoiseSchedule):
    """beta_1 ... beta_T as listed; ``num_timesteps`` is their number."""

    class Options(NoiseSchedule.Options):
        betas: list[float] | None = Field(
            None,
            description="every beta_t, t = 1 ... T, each in (0, 1); unset: the "
            "linear 1e-4 ... 0.02 of Ho et al. over num_timesteps",
        )

        @model_validator(mode="before")
        @classmethod
        def _count(cls, data):
            if isinstance(data, dict) and isinstance(data.get("betas"), list) and "num_timesteps" not in data:
                data = {**data, "num_timesteps": len(data["betas"])}
            return data

        @model_validator(mode="after")
        def _valid(self) -> GivenBetas.Options:
            if self.betas is None:
                return self
            if len(self.betas) != self.num_timesteps:
                raise ValueError(f"{len(self.betas)} betas given for num_timesteps = {self.num_timesteps}")
            if not all(0 < b < 1 for b in self.betas):
                raise ValueError("every beta must lie in (0, 1)")
            return self

    def make_betas(self) -> torch.Tensor:
        if self.options.betas is None:
            return torch.linspace(1e-4, 0.02, self.options.num_timesteps, dtype=torch.float64)
        return torch.tensor(self.options.betas, dtype=torch.float64)
