"""Guidance, D_0 + w (D - D_0) with w > 1, and the owner of its two forms:

- classifier-free (Ho & Salimans 2022): D is the class-conditional network asked for a class, D_0 the same
  network asked for no class (:data:`~ddpmkit.diffusion.NULL_CLASS`), both in one forward pass of 2B images
  (:class:`ClassConditioned`). The paper's eq. 6 writes (1 + w') eps(z, c) - w' eps(z): our w is its 1 + w'.
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): D_0 is a
  smaller network of the same family trained for a few hundred steps on the same data, schedule and
  conditioning (:class:`GuidedDenoiser`; :mod:`ddpmkit.run.guide` is the guide's own run, inside the main
  run's folder). Where the
  two disagree, the main one is usually right about what makes an image look like the data;
  extrapolating past it pushes samples away from the guide's errors. For a conditional run the guide is
  conditional too and both are asked for the same class, as in the paper.

Either may be limited to an interval of steps (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval improves sample and distribution quality"): outside it w = 1, the network alone. Samplers see an
ordinary ``denoiser(x_t, t)``, so every sampler guides without knowing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpmkit.diffusion import NULL_CLASS, Cond, denoise, split_prediction, training_target
from ddpmkit.interfaces import Denoiser, NoiseSchedule


def guided_at(t: torch.Tensor, interval: Sequence[int] | None) -> torch.Tensor:
    """Per image: whether step t lies in the guidance interval [t_low, t_high] (every step without one)."""
    if interval is None:
        return torch.ones_like(t, dtype=torch.bool)
    return (t >= interval[0]) & (t <= interval[1])


@torch.compiler.disable  # a data-dependent branch: left to Python, not a graph break warned about
def _any_guided(t: torch.Tensor, interval: Sequence[int]) -> bool:
    return bool(guided_at(t, interval).any())


def mix(
    reference: torch.Tensor, output: torch.Tensor, weight: float, t: torch.Tensor, interval: Sequence[int] | None = None
) -> torch.Tensor:
    """D_0 + w (D - D_0) where t lies in ``interval``, D elsewhere: the guided prediction, per image."""
    guided = reference + weight * (output - reference)
    if interval is None:
        return guided
    return torch.where(guided_at(t, interval).view(-1, *[1] * (output.ndim - 1)), guided, output)


class GuidedDenoiser(Denoiser):
    """``main`` guided by ``guide``: D_guide + w (D_main - D_guide), in ``main``'s prediction target.

    Each target is an affine function of the network output for a fixed (x_t, t) (:mod:`ddpmkit.diffusion`),
    and the two weights sum to 1, so mixing outputs is mixing the x_0 (and eps) estimates; a guide that
    predicts another target is converted to ``main``'s first. w = 1 is ``main``, w = 0 is ``guide``.
    """

    conditions = frozenset({"class"})  # passed on to both networks

    def __init__(
        self,
        main: Denoiser,
        guide: Denoiser,
        weight: float,
        schedule: NoiseSchedule,
        interval: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            image_shape=main.image_shape, num_timesteps=main.num_timesteps, num_classes=getattr(main, "num_classes", 0)
        )
        self.main, self.guide = main, guide
        self.weight = float(weight)
        self.schedule = schedule
        self.interval = interval
        self.prediction = main.prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        out = denoise(self.main, x_t, t, cond).float()
        if self.interval is not None and not _any_guided(t, self.interval):  # the guide is not needed outside it
            return out
        ref = denoise(self.guide, x_t, t, cond).float()
        if self.guide.prediction != self.prediction:
            schedule = self.schedule.to(x_t.device)
            x0, eps = split_prediction(schedule, x_t.float(), t, ref, self.guide.prediction)
            ref = training_target(schedule, x0, eps, t, self.prediction)
        return mix(ref, out, self.weight, t, self.interval)


class ClassConditioned(Denoiser):
    """A class-conditional ``main`` asked for ``labels`` (one per image of the batch), with classifier-free
    guidance of weight w: D(x | none) + w (D(x | label) - D(x | none)) in one forward pass of 2B images
    (w = 1: the labels alone, B images). It is called ``(x_t, t)``, as samplers call any denoiser."""

    def __init__(
        self, main: Denoiser, labels: torch.Tensor, weight: float = 1.0, interval: Sequence[int] | None = None
    ) -> None:
        super().__init__(image_shape=main.image_shape, num_timesteps=main.num_timesteps)
        self.main = main
        self.labels = labels.to(torch.int64)
        self.weight = float(weight)
        self.interval = interval
        self.prediction = main.prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        if n != len(self.labels):
            raise ValueError(
                f"the sampler called the denoiser with {n} images for a batch of {len(self.labels)} "
                "labelled ones; a sampler must keep the batch it was given"
            )
        labels = self.labels.to(x_t.device)
        if self.weight == 1.0 or not bool(guided_at(t, self.interval).any()):
            return denoise(self.main, x_t, t, {"class": labels})
        both = denoise(
            self.main,
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            {"class": torch.cat([labels, torch.full_like(labels, NULL_CLASS)])},
        ).float()
        out, ref = both.chunk(2)
        return mix(ref, out, self.weight, t, self.interval)
