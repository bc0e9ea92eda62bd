"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the guided
denoiser and the guide's own run inside the main run's folder (:mod:`ddpmkit.sampling.loaded` loads it to sample).

The guide is a smaller network of the same family trained for a few hundred steps on the same data and
schedule. Where it and the main network disagree, the main one is usually right about what makes an
image look like the data; extrapolating past the main network, D_w = D_guide + w (D_main - D_guide) with
w > 1 (the guidance form of the paper's eq. 1 with the guide as D_0), pushes samples away from the
guide's errors. For an unconditional model this trades a little diversity for cleaner samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddpmkit.diffusion import denoise, split_prediction, training_target
from ddpmkit.interfaces import Denoiser, NoiseSchedule

if TYPE_CHECKING:
    from ddpmkit.run.config import RunConfig
    from ddpmkit.run.components import Components

#: The guide's run folder, inside the main run's folder.
GUIDE_DIR = "guide"


class GuidedDenoiser(Denoiser):
    """``main`` guided by ``guide``: D_guide + w (D_main - D_guide), in ``main``'s prediction target.

    Each target is an affine function of the network output for a fixed (x_t, t) (:mod:`ddpmkit.diffusion`),
    and the two weights sum to 1, so mixing outputs is mixing the x_0 (and eps) estimates; a guide that
    predicts another target is converted to ``main``'s first. w = 1 is ``main``, w = 0 is ``guide``.
    """

    def __init__(self, main: Denoiser, guide: Denoiser, weight: float, schedule: NoiseSchedule) -> None:
        super().__init__(image_shape=main.image_shape, num_timesteps=main.num_timesteps)
        self.main, self.guide = main, guide
        self.weight = float(weight)
        self.schedule = schedule
        self.prediction = main.prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoise(self.main, x_t, t).float()
        ref = denoise(self.guide, x_t, t).float()
        if self.guide.prediction != self.prediction:
            schedule = self.schedule.to(x_t.device)
            x0, eps = split_prediction(schedule, x_t.float(), t, ref, self.guide.prediction)
            ref = training_target(schedule, x0, eps, t, self.prediction)
        return ref + self.weight * (out - ref)


def guide_dir(run_dir: Path) -> Path:
    return Path(run_dir) / GUIDE_DIR


def guide_config(cfg: "RunConfig") -> "RunConfig":
    """The guide's run: ``cfg`` with ``[guidance] denoiser_options`` over the denoiser's options, trained for
    ``guidance.steps`` (at most the main run's steps) in RUN/guide, without compilation, sampling nothing."""
    from ddpmkit.run.config import config_from_dict

    data = cfg.model_dump(mode="json")
    data["run"].update(dir=str(cfg.run_dir), name=GUIDE_DIR)
    data["denoiser"]["options"] = {**data["denoiser"]["options"], **cfg.guidance.denoiser_options}
    main_steps = data["train"]["max_steps"]
    data["train"].update(
        max_steps=min(cfg.guidance.steps, main_steps) if main_steps is not None else cfg.guidance.steps,
        keep_checkpoints=1,
        compile=False,  # a few hundred steps never repay the compiler's set-up
        time_budget=None,  # the main run's budget covers the guide
    )
    data["sample"].update(num_images=0, trajectory_images=0)
    data["guidance"] = {}
    return config_from_dict(data)


def build_guide(cfg: "RunConfig") -> tuple["RunConfig", "Components"]:
    """The guide's run config and its freshly built (untrained) components."""
    from ddpmkit.run.components import build_components

    guide = guide_config(cfg)
    return guide, build_components(guide)
