"""Second-order solvers of the probability-flow ODE outside the reverse-step family: Heun (Karras et al. 2022,
Algorithm 1) and DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2). Both step between levels of the schedule they are
given, so they sample every objective (ddpm's schedule, or flow's and EDM's own levels) the same way."""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from ddpmkit.diffusion import (
    alpha_bar,
    gaussian_solver_moments,
    karras_timesteps,
    ode_sigma,
    predict_x0_eps,
    takes_x0,
)
from ddpmkit.errors import ConfigError
from ddpmkit.interfaces import Denoiser, NoiseSchedule, Sampler, SamplerCallback
from ddpmkit_plugins.ddim import spaced_timesteps


class _ODESolver(Sampler):
    """Shared: the levels a solver visits, its cost, and the exact answer it reaches on Gaussian data."""

    solver: ClassVar[str] = ""

    class Options(Sampler.Options):
        steps: int = Field(20, ge=1, description="steps between noise levels (at most T)")
        spacing: Literal["karras", "linspace", "leading", "trailing"] = Field(
            "karras",
            description="how the steps are spread over the schedule's levels: karras (even in sigma^(1/7) from T-1 "
            "down to 0, Karras et al. 2022, eq. 5), or evenly in t as DDIM's",
        )

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        T = schedule.num_timesteps
        if self.options.steps > T:
            raise ConfigError(f"sampler.options.steps: {self.options.steps} steps exceed the schedule's T = {T}")
        if self.options.spacing == "karras":
            return karras_timesteps(schedule, self.options.steps)
        return spaced_timesteps(T, self.options.steps, self.options.spacing)

    def gaussian_answer(self, schedule: NoiseSchedule, mu: float, s: float) -> tuple[float, float]:
        return gaussian_solver_moments(schedule, self.timesteps(schedule), mu, s, self.solver)

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
        s = schedule.to(denoiser.device)
        x = torch.randn(shape, generator=generator, device=generator.device).to(denoiser.device)
        memory: dict = {}
        ts = self.timesteps(schedule)
        for index, (t, t_next) in enumerate(zip(ts, [*ts[1:], -1])):
            x, x0 = self.step(denoiser, s, x, t, t_next, memory)
            self._report(callback, index, t, x, x0)
        return x.clamp(-1.0, 1.0)

    @abc.abstractmethod
    def step(
        self, denoiser: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, t: int, t_next: int, memory: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x at level ``t_next`` (-1: the data) from x at level ``t``, and the step's x_0 estimate; ``memory`` is what
        a multistep method keeps between the steps of one draw."""

    def _report(self, callback: SamplerCallback | None, index: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if callback is None:
            return
        if takes_x0(callback):
            callback(index, t, x, x0=x0)
        else:
            callback(index, t, x)


class HeunSampler(_ODESolver):
    """Heun's method on dy/dsigma = eps with y = x / sqrt(abar), sigma = sqrt((1 - abar) / abar) (Karras et al. 2022,
    Algorithm 1 without churn): an Euler step (which is DDIM's), corrected by the slope at its end; the last step,
    to sigma = 0, is Euler's. n steps cost 2n - 1 evaluations."""

    solver = "heun"
    order = 2

    def num_evaluations(self, schedule: NoiseSchedule) -> int:
        return 2 * len(self.timesteps(schedule)) - 1

    def step(
        self, denoiser: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, t: int, t_next: int, memory: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        root, root_next = alpha_bar(schedule, t) ** 0.5, alpha_bar(schedule, t_next) ** 0.5
        sig, sig_next = ode_sigma(schedule, t), ode_sigma(schedule, t_next)
        x0, eps = predict_x0_eps(denoiser, schedule, x, t)
        y = x / root
        y_next = y + (sig_next - sig) * eps
        if t_next >= 0:
            _, eps_next = predict_x0_eps(denoiser, schedule, y_next * root_next, t_next)
            y_next = y + (sig_next - sig) * (eps + eps_next) / 2
        return y_next * root_next, x0


class DPMSolverPP2M(_ODESolver):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): the exact integral of the linear part in lambda = log(alpha /
    sigma), with the x_0 estimate extrapolated from this step and the last (first order at the first step and at the
    last, which lands on the estimate itself). One evaluation per step."""

    solver = "dpmpp-2m"
    order = 2

    def step(
        self, denoiser: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, t: int, t_next: int, memory: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0, _ = predict_x0_eps(denoiser, schedule, x, t)
        if t_next < 0:
            return x0, x0
        ab, ab_next = alpha_bar(schedule, t), alpha_bar(schedule, t_next)
        h = 0.5 * (math.log(ab_next / (1 - ab_next)) - math.log(ab / (1 - ab)))
        estimate = x0
        previous = memory.get("previous")
        if previous is not None:
            r = previous[1] / h
            estimate = (1 + 1 / (2 * r)) * x0 - previous[0] / (2 * r)
        memory["previous"] = (x0, h)
        return ((1 - ab_next) / (1 - ab)) ** 0.5 * x - ab_next**0.5 * math.expm1(-h) * estimate, x0
