"""Pluggy hook specifications: what a ddpmkit plugin module may implement.

A plugin is a module named by an entry point in the group ``ddpmkit``; it implements any of
these hooks with ``@ddpmkit.hookimpl``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "ddpmkit"
#: The plugin API this ddpmkit speaks. A plugin module may declare ``DDPMKIT_PLUGIN_API = 3`` (or a
#: list of versions); a plugin that declares none is assumed compatible.
PLUGIN_API_VERSION = 4
#: the file in the run folder the built-in metrics plugin writes, one JSON record a step (removed by --fresh)
METRICS_FILE = "metrics.jsonl"
#: Every plugin API this ddpmkit still loads: API 1 and 2 plugins keep working (API 2 and 3 only added:
#: API 3 the ``cond`` argument and ``conditions`` of a denoiser, which an unconditional run never uses; API 4 the
#: objective, a fourth kind, and a denoiser's ``continuous_time``, which a ``ddpm`` run never uses).
SUPPORTED_PLUGIN_APIS = (1, 2, 3, 4)

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: ``register(name, target)``: target is a class or a lazy ``"module:attr"`` string.
Register = Callable[[str, Any], None]


@hookspec
def register_schedules(register: Register) -> None:
    """Register NoiseSchedule classes by name."""


@hookspec
def register_denoisers(register: Register) -> None:
    """Register Denoiser classes by name."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register Sampler classes by name."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register Objective classes by name (plugin API 4)."""


# --- training events: a plugin adds a logger or a callback without touching the loop -----------
# ``run`` is a :class:`ddpmkit.run.events.RunInfo` (run directory, validated config, device, steps);
# ``options`` is the plugin's own validated ``[plugins.<name>]`` table (its module's ``Options``
# model), or None for a plugin that declares no options. Ask only for the arguments you need.


@hookspec
def train_start(run: Any, options: Any) -> None:
    """Training is about to begin (or resume at ``run.start_step``)."""


@hookspec
def step_end(run: Any, step: int, metrics: dict[str, Any], options: Any) -> None:
    """An optimizer step finished; ``metrics`` holds step, epoch, loss, lr, images_per_s, time and elapsed_s (see
    ``ddpmkit.testing.METRIC_KEYS``), grad_norm when train.grad_clip is set, skipped on a skipped non-finite step,
    and at the first step of each start the plan it made (speed, time_plan)."""


@hookspec
def checkpoint_written(run: Any, step: int, path: Any, options: Any) -> None:
    """A complete checkpoint was written to ``path``."""


@hookspec
def samples_written(run: Any, paths: list[Any], options: Any) -> None:
    """The run's sample files (grid, .npz, trajectory) were written."""


@hookspec
def train_end(run: Any, step: int, interrupted: bool, options: Any) -> None:
    """Training stopped at ``step``: finished, or ``interrupted`` by a signal or a failing hook."""


@hookspec
def evaluated(run: Any, result: dict[str, Any], options: Any) -> None:
    """``ddpmkit eval RUN`` scored samples of the trained run (``run.start_step`` is the step of its weights);
    ``result`` is what eval prints with --json and keeps in ``RUN/eval.json``: ``samples`` and ``floor`` hold
    fid, kid, precision, recall, confident_share, ... (added in ddpmkit 0.7; older ddpmkit never calls it). For a
    class-conditional run it also holds ``conditional``: ``class_accuracy``, ``classes_drawn``, ``mean_class_fid``,
    ``mean_class_floor_fid`` (None where too few samples of a class were drawn) and ``per_class``, one dict per
    class drawn with ``class``, ``num``, ``accuracy`` and, for classes of at least 10 samples, ``fid`` and
    ``floor_fid``. An unconditional run's result has no ``conditional`` key."""
