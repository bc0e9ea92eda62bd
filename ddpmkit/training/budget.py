"""Time-budgeted training: ``train.time_budget`` turned into a number of steps before the run starts.

The plan comes from the images/s measured for the run's own model, batch and speed modes (the guide's
too: it trains first, inside the same budget), so the learning-rate schedule and the EMA warm-up are laid
over the steps that fit. Before anything trains, the whole plan is estimated from the speed modes' figures
(cached); the steps themselves are fixed when the budgeted network starts, after the guide: from the time
the guide really took and a fresh measurement of steady training (and its set-up, a compilation included),
since a machine's speed drifts with what else runs on it. Once, after at least two minutes of the loop (at the
first checkpoint after them, where one comes soon), the steps are planned again from the loop's own images/s, and
the cosine decay laid over them from there. The plan is recorded in the checkpoints, so a resumed run keeps it and
stays exact; sampling is not part of the budget.

Where the budget buys too few steps of the configured model (``train.budget_min_steps``), a smaller one of
``train.smaller_models`` is trained instead, chosen from the same estimates at the run's first start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ddpmkit.errors import ConfigError
from ddpmkit.run.config import MAX_EPOCHS, RunConfig
from ddpmkit.run.guide import guide_config
from ddpmkit.runtime.units import format_duration
from ddpmkit.training.autotune import RateTimer, Timer, measured_rate, steady_rate

#: The share of the budget planned as training steps: the rest covers checkpoints, events and the drift of
#: a shared machine's speed over the run, which a 10-second measurement cannot see. Measured (loop rate over
#: planned rate): 0.98 in a 4-minute and 0.87 in a 15-minute budget on an AMX Xeon, 0.75-0.84 on an AVX2 EPYC
#: with the shorter measurement before it (docs/benchmarks.md).
PLANNED_SHARE = 0.92
#: The share of the budget the re-plan fills: after minutes of the loop's own rate only its drift is left to
#: cover (per 100 steps the loop's rate varied from -12 % to +14 % around its mean on an AVX2-only EPYC Zen 3)
REPLANNED_SHARE = 0.96
#: The loop re-plans after at least this many seconds of its steps: its first 100 steps ran 11 % below its mean on
#: an AVX2-only EPYC Zen 3, and on a Zen 4 a re-plan at the first checkpoint, 65 s in, took 491 images/s for a
#: loop that then ran at 525 (89.8 % of the budget), so a shorter window misses low
REPLAN_AFTER_S = 120.0
#: ...and only over at least this many steps (the first few, set-up and compilation, are not timed)
REPLAN_MIN_STEPS = 20


@dataclass(frozen=True)
class TimePlan:
    budget_s: float
    steps: int
    images_per_s: float
    guide_s: float
    #: seconds before the first step (building, compiling), measured with the rate
    setup_s: float = 0.0
    #: whether ``guide_s`` is the time the guide took (else it is estimated from the guide's rate)
    guide_trained: bool = False
    #: the re-plan from the loop's own rate: the step it was made at, the steps planned before it, the loop's
    #: images/s and the seconds the main network had used by then
    replanned_at: int | None = None
    first_steps: int | None = None
    loop_images_per_s: float | None = None
    spent_s: float | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def replan_step(self, batch: int, start_step: int, checkpoint_every: int) -> int | None:
        """The step at which a start from ``start_step`` re-plans: after ``REPLAN_AFTER_S`` of its steps at the
        planned rate, at the first checkpoint from there if it comes within as many steps again (a resumed run then
        finds the new plan recorded at once), else there; None where it re-planned already or would end first."""
        if self.replanned_at is not None:
            return None
        window = max(REPLAN_MIN_STEPS, round(REPLAN_AFTER_S * self.images_per_s / batch))
        checkpoint = -(-(start_step + window) // checkpoint_every) * checkpoint_every
        at = checkpoint if checkpoint - start_step <= 2 * window else start_step + window
        return at if at < self.steps else None

    def replanned(self, step: int, images_per_s: float, spent_s: float, batch: int, cap: int | None) -> TimePlan:
        """The plan from ``step`` on, at the loop's own ``images_per_s`` with ``spent_s`` of the budget used by
        the main network so far (at most ``cap`` steps, at least ``step``)."""
        left = max(0.0, self.budget_s * REPLANNED_SHARE - self.guide_s - spent_s)
        steps = step + int(left * images_per_s / batch)
        if cap is not None:
            steps = min(steps, cap)
        return replace(
            self,
            steps=max(step, steps),
            replanned_at=step,
            first_steps=self.steps,
            loop_images_per_s=images_per_s,
            spent_s=spent_s,
        )

    def describe(self) -> str:
        took = "took" if self.guide_trained else "about"
        guide = f"the guide {took} {format_duration(self.guide_s)}, then " if self.guide_s else ""
        setup = f" after {self.setup_s:.0f} s of set-up" if self.setup_s >= 1 else ""
        first = self.steps if self.first_steps is None else self.first_steps
        said = (
            f"time budget {format_duration(self.budget_s)}: {guide}{first:,} steps at the "
            f"{self.images_per_s:,.1f} images/s measured here{setup}"
        )
        if self.replanned_at is None:
            return said
        return (
            f"{said}; re-planned at step {self.replanned_at:,} from the loop's own {self.loop_images_per_s or 0:,.1f} "
            f"images/s: {self.steps:,} steps"
        )


def plan(
    cfg: RunConfig,
    device: torch.device,
    *,
    timer: Timer | None = None,
    final: bool = False,
    guide_took: float | None = None,
    rate_timer: RateTimer | None = None,
) -> TimePlan:
    """How many steps of ``cfg`` fit its ``train.time_budget`` on ``device`` (at most ``train.max_steps``).

    An estimate from the speed modes' (cached) figures; ``final``: the plan the run keeps, from steady training
    measured now, set-up included. The guide's time is ``guide_took`` (the seconds it took in this start), else
    estimated from its measured rate.
    """
    budget = cfg.train.time_budget
    assert budget is not None
    if final:
        ips, setup = steady_rate(cfg, device, timer=timer, rate_timer=rate_timer)
    else:
        (_, ips), setup = measured_rate(cfg, device, timer=timer), 0.0
    guide_s = 0.0 if guide_took is None else guide_took
    if cfg.trains_guide and guide_took is None:
        guide = guide_config(cfg)
        _, guide_ips = measured_rate(guide, device, timer=timer)
        guide_s = guide.train.max_steps * guide.train.batch_size / guide_ips
    steps = int((budget * PLANNED_SHARE - guide_s - setup) * ips / cfg.train.batch_size)
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    if steps < 1:
        raise ConfigError(
            f"train.time_budget = {format_duration(budget)} fits no training step here: "
            + (f"the guide alone needs about {format_duration(guide_s)}; " if guide_s else "")
            + f"one step of batch {cfg.train.batch_size} takes about {cfg.train.batch_size / ips:.1f} s"
        )
    return TimePlan(budget, steps, ips, guide_s, setup, guide_took is not None and cfg.trains_guide)


@dataclass(frozen=True)
class ModelChoice:
    """The model a time budget trains: 0 is the configured one, i is ``train.smaller_models[i - 1]``; with the
    steps the budget was estimated to buy of each model tried (in order, until one reached ``min_steps``)."""

    index: int
    steps: list[int]
    min_steps: int

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, cfg: RunConfig) -> str:
        chosen, n = self.index, self.steps[self.index]
        if n >= self.min_steps and chosen == 0:
            return (
                f"the configured one, {n:,} steps in the budget (at least train.budget_min_steps = {self.min_steps:,})"
            )
        tried = ", ".join(f"{k:,} steps of {model_label(cfg, i)}" for i, k in enumerate(self.steps) if i != chosen)
        if n >= self.min_steps:
            why = ""
        elif chosen == len(self.steps) - 1:
            why = f" (the last offered: none reaches {self.min_steps:,})"
        else:  # a loaded machine: a smaller model measured slower than a larger one
            why = f" (none reaches {self.min_steps:,}: this one buys the most)"
        return (
            f"{model_label(cfg, chosen)}: the budget buys about {tried}, fewer than train.budget_min_steps = "
            f"{self.min_steps:,}, and about {n:,} of this one{why}"
        )


def model_label(cfg: RunConfig, index: int) -> str:
    """``the configured model``, or ``smaller_models[i]`` with its options, for ``index`` as in ModelChoice."""
    if index == 0:
        return "the configured model"
    m = cfg.train.smaller_models[index - 1]
    options = ", ".join(f"{k} = {v}" for k, v in m.denoiser_options.items())
    return f"train.smaller_models[{index - 1}]" + (f" ({options})" if options else "")


def choose_model(cfg: RunConfig, device: torch.device, *, timer: Timer | None = None) -> ModelChoice:
    """Which model ``cfg``'s time budget trains on ``device``: its own where the estimated plan reaches
    ``train.budget_min_steps``, else the first of ``train.smaller_models`` whose plan does, else the last.

    Few steps of a larger network sample worse than several times the steps of a smaller one: on MNIST, 560
    steps of the 2.0 M-parameter UNet gave a classifier FID of 82.8 against 39.8 for 1,990 of a 0.5 M one
    (docs/quality.md). The estimates use the speed modes' measured (and cached) images/s, like ``plan``.
    """
    min_steps = cfg.train.budget_min_steps
    if cfg.train.time_budget is None or min_steps is None or not cfg.train.smaller_models:
        raise ValueError("choose_model needs train.time_budget, budget_min_steps and smaller_models")
    last = len(cfg.train.smaller_models)
    steps: list[int] = []
    for index in range(last + 1):
        try:
            steps.append(plan(cfg.with_smaller_model(index), device, timer=timer).steps)
        except ConfigError:  # not one step of this model fits: a smaller one may
            if index == last:
                raise
            steps.append(0)
        if steps[-1] >= min_steps:
            return ModelChoice(len(steps) - 1, steps, min_steps)
    # none reaches min_steps: the one that buys the most steps (on a loaded machine a smaller model can buy fewer)
    return ModelChoice(max(range(len(steps)), key=lambda i: (steps[i], -i)), steps, min_steps)


def with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """``cfg`` training exactly ``steps`` steps (the budget's plan replaces ``epochs``)."""
    train = cfg.train.model_copy(update={"max_steps": steps, "epochs": MAX_EPOCHS})
    return cfg.model_copy(update={"train": train})
