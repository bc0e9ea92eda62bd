"""The built-in objectives (plugin API 4): ``ddpm`` (Ho et al. 2020, as ddpmkit always trained), ``flow`` (rectified
flow, Liu et al. 2023 / Lipman et al. 2023, with SD3's logit-normal times) and ``edm`` (Karras et al. 2022)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from ddpmkit.diffusion import (
    draw_training_batch_noise,
    edm_preconditioning,
    flow_split,
    karras_sigmas,
    loss_weight,
    per_image,
    split_prediction,
    training_loss,
    training_target,
)
from ddpmkit.errors import ConfigError
from ddpmkit.interfaces import ComponentOptions, Denoiser, NoiseSchedule, Objective


class DDPMObjective(Objective):
    """Ho et al. (2020): the run's ``[schedule]`` over T integer steps, t uniform, the denoiser's own target
    (``prediction``: epsilon, x0 or v) with uniform or min-SNR weighting. Its samplers see the schedule itself."""

    uses_schedule = True
    continuous_time = False

    class Options(ComponentOptions):
        loss_weighting: Literal["uniform", "min_snr"] = Field(
            "uniform",
            description="uniform (Ho et al. 2020, eq. 14) or min_snr (Hang et al. 2023); train.loss_weighting sets it",
        )
        min_snr_gamma: float = Field(
            5.0, gt=0, allow_inf_nan=False, description="gamma of min_snr weighting; train.min_snr_gamma sets it"
        )

    @property
    def tables(self) -> NoiseSchedule:
        if self.schedule is None:
            raise ConfigError("the ddpm objective needs the run's schedule")
        return self.schedule

    @property
    def num_levels(self) -> int:
        return self.tables.num_timesteps

    def levels(self) -> torch.Tensor:
        return torch.arange(self.num_levels)

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.tables
        t = tau.to(s.device)
        return s.sqrt_alphas_cumprod[t], s.sqrt_one_minus_alphas_cumprod[t]

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_levels, (n,), generator=generator, device=generator.device)

    def draw_training(
        self, batch: int, shape: tuple[int, ...], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return draw_training_batch_noise(batch, shape, self.num_levels, generator)

    def network_time(self, tau: torch.Tensor) -> torch.Tensor:
        return tau

    def split(self, x_t: torch.Tensor, tau: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_prediction(self.tables.to(x_t.device), x_t, tau.to(x_t.device), output, self.prediction)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return training_target(self.tables.to(x0.device), x0, eps, tau.to(x0.device), self.prediction)

    def weight(self, tau: torch.Tensor) -> torch.Tensor:
        o = self.options
        return loss_weight(self.tables, tau, self.prediction, o.loss_weighting, o.min_snr_gamma)

    def training_loss(
        self, denoiser: torch.nn.Module, x0: torch.Tensor, tau: torch.Tensor, noise: torch.Tensor, cond=None
    ) -> torch.Tensor:
        # eq. 14 as ddpmkit has always computed it (bit for bit: runs of 0.13 and before resume exactly)
        o = self.options
        return training_loss(
            denoiser, self.tables, x0, tau, noise, weighting=o.loss_weighting, gamma=o.min_snr_gamma, cond=cond
        )

    def sampling_schedule(self) -> NoiseSchedule:
        return self.tables

    def sampling_network(self, denoiser: Denoiser) -> Denoiser:
        return denoiser


class FlowObjective(Objective):
    """Rectified flow: x_t = (1 - t) x_0 + t eps on t in [0, 1], the network predicts the velocity eps - x_0, loss
    unweighted; training times logit-normal (Esser et al. 2024, SD3, section 3.1) or uniform. Samplers walk
    t = 1/L, 2/L, ..., 1 (L levels); DDIM on them is the flow's Euler step."""

    class Options(Objective.Options):
        time_sampling: Literal["logit_normal", "uniform"] = Field(
            "logit_normal", description="training times: sigmoid of a normal (SD3's choice) or uniform in [0, 1]"
        )
        logit_mean: float = Field(0.0, allow_inf_nan=False, description="mean of the normal under the sigmoid")
        logit_std: float = Field(1.0, gt=0, allow_inf_nan=False, description="std of the normal under the sigmoid")

    def levels(self) -> torch.Tensor:
        return torch.arange(1, self.num_levels + 1, dtype=torch.float64) / self.num_levels

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - tau, tau

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        o, dev = self.options, generator.device
        if o.time_sampling == "uniform":
            return torch.rand((n,), generator=generator, device=dev)
        return torch.sigmoid(o.logit_mean + o.logit_std * torch.randn((n,), generator=generator, device=dev))

    def network_time(self, tau: torch.Tensor) -> torch.Tensor:
        # t L, as SD3 tells its network 1000 t and diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=L)
        # does: an exported flow run is called at the times it was trained at
        return tau.float() * self.num_levels

    def split(self, x_t: torch.Tensor, tau: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return flow_split(x_t, per_image(tau, x_t), output)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return eps - x0


class EDMObjective(Objective):
    """Karras et al. (2022): x = x_0 + sigma eps, ln sigma ~ N(p_mean, p_std^2) in training, the preconditioned
    denoiser D = c_skip x + c_out F(c_in x) of table 1 with lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma
    sigma_data)^2, which makes F's loss unweighted (eq. 8). Samplers walk the rho-spaced levels of eq. 5 from
    sigma_min to sigma_max; DDIM on them is EDM's Euler step. The network is told sigma as an affine map of ln sigma
    onto [0, L - 1], where EDM's c_noise = ln(sigma) / 4 is another affine map of the same (a decision: it keeps the
    time range every ddpmkit denoiser was built for)."""

    class Options(Objective.Options):
        sigma_data: float = Field(
            0.5, gt=0, allow_inf_nan=False, description="std of the data (0.5 for [-1, 1] images)"
        )
        sigma_min: float = Field(0.002, gt=0, allow_inf_nan=False, description="lowest noise level samplers visit")
        sigma_max: float = Field(80.0, gt=0, allow_inf_nan=False, description="highest noise level samplers visit")
        rho: float = Field(7.0, gt=0, allow_inf_nan=False, description="spacing of the levels (eq. 5)")
        p_mean: float = Field(-1.2, allow_inf_nan=False, description="mean of ln sigma in training")
        p_std: float = Field(1.2, gt=0, allow_inf_nan=False, description="std of ln sigma in training")

        @model_validator(mode="after")
        def _ordered(self):
            if self.sigma_min >= self.sigma_max:
                raise ValueError(f"sigma_min {self.sigma_min:g} must lie below sigma_max {self.sigma_max:g}")
            return self

    def levels(self) -> torch.Tensor:
        o = self.options
        return karras_sigmas(self.num_levels, o.sigma_min, o.sigma_max, o.rho)

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(tau), tau

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        return (o.p_mean + o.p_std * torch.randn((n,), generator=generator, device=generator.device)).exp()

    def network_time(self, tau: torch.Tensor) -> torch.Tensor:
        o = self.options
        low, high = math.log(o.sigma_min), math.log(o.sigma_max)
        return (tau.float().log() - low) * ((self.num_levels - 1) / (high - low))

    def input_scale(self, tau: torch.Tensor) -> torch.Tensor:
        return edm_preconditioning(tau.float(), self.options.sigma_data)[2]

    def split(self, x_t: torch.Tensor, tau: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = per_image(tau, x_t)
        c_skip, c_out, _ = edm_preconditioning(sigma, self.options.sigma_data)
        x0 = c_skip * x_t + c_out * output
        return x0, (x_t - x0) / sigma

    def target(self, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        sigma = per_image(tau, x0)
        c_skip, c_out, _ = edm_preconditioning(sigma, self.options.sigma_data)
        return (x0 - c_skip * (x0 + sigma * eps)) / c_out

    def weight(self, tau: torch.Tensor) -> torch.Tensor:
        # lambda(sigma) c_out(sigma)^2 = 1 (Karras et al. 2022, eq. 8 with table 1)
        return torch.ones(tau.shape, dtype=torch.float32, device=tau.device)
