"""Time-budgeted training: ``train.time_budget`` turned into a number of steps before the run starts.

The plan comes from the images/s measured for the run's own model, batch and speed modes (the guide's
too: it trains first, inside the same budget), so the learning-rate schedule and the EMA warm-up are laid
over the steps that fit. It is fixed at the first start and recorded in the checkpoints, so a resumed run
keeps it and stays exact; sampling is not part of the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ddpmkit.errors import ConfigError
from ddpmkit.run.config import MAX_EPOCHS, RunConfig
from ddpmkit.run.guide import guide_config
from ddpmkit.runtime.units import format_duration
from ddpmkit.training.autotune import Timer, measured_rate

#: The share of the budget planned as training steps: the rest covers checkpoints, events and the first
#: steps' set-up, which the steady-state rate does not include.
PLANNED_SHARE = 0.95


@dataclass(frozen=True)
class TimePlan:
    budget_s: float
    steps: int
    images_per_s: float
    guide_s: float

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        guide = f"the guide about {format_duration(self.guide_s)}, then " if self.guide_s else ""
        return (f"time budget {format_duration(self.budget_s)}: {guide}{self.steps:,} steps at the "
                f"{self.images_per_s:,.1f} images/s measured here")


def plan(cfg: RunConfig, device: torch.device, *, timer: Timer | None = None) -> TimePlan:
    """How many steps of ``cfg`` fit its ``train.time_budget`` on ``device`` (at most ``train.max_steps``)."""
    budget = cfg.train.time_budget
    assert budget is not None
    _, ips = measured_rate(cfg, device, timer=timer)
    guide_s = 0.0
    if cfg.trains_guide:
        guide = guide_config(cfg)
        _, guide_ips = measured_rate(guide, device, timer=timer)
        guide_s = guide.train.max_steps * guide.train.batch_size / guide_ips
    steps = int((budget * PLANNED_SHARE - guide_s) * ips / cfg.train.batch_size)
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    if steps < 1:
        raise ConfigError(
            f"train.time_budget = {format_duration(budget)} fits no training step here: "
            + (f"the guide alone needs about {format_duration(guide_s)}; " if guide_s else "")
            + f"one step of batch {cfg.train.batch_size} takes about {cfg.train.batch_size / ips:.1f} s"
        )
    return TimePlan(budget, steps, ips, guide_s)


def with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """``cfg`` training exactly ``steps`` steps (the budget's plan replaces ``epochs``)."""
    train = cfg.train.model_copy(update={"max_steps": steps, "epochs": MAX_EPOCHS})
    return cfg.model_copy(update={"train": train})
