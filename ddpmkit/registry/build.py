"""Building one component from its registered name and options: validate the options once, construct
it, and check what it declares. ``create_*`` are these steps from Python; a run's whole set is built
from its config by :mod:`ddpmkit.run.components`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from ddpmkit.errors import ConfigError, PluginCodeError
from ddpmkit.registry import discovery as plugins
from ddpmkit.registry.blame import blame
from ddpmkit.validation import problems

if TYPE_CHECKING:
    from ddpmkit.interfaces import Denoiser, NoiseSchedule, Objective, Sampler
    from ddpmkit.registry.discovery import Component


def validate_options(component: Component, options: Mapping[str, Any] | BaseModel, prefix: str = "") -> BaseModel:
    """Validate ``options`` with the Options model of ``component``; ConfigError names the key."""
    model = plugins.load(component).Options
    if isinstance(options, model):
        return options
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        where = tuple((prefix or f"{component.kind}.options").split("."))
        raise ConfigError("; ".join(f"{key}: {msg}" for key, msg in problems(exc, model, where))) from None


def construct(component: Component, options: BaseModel, **context: Any) -> Any:
    """``cls(options, **context)`` for ``component``, with any failure reported as one line naming it."""
    cls = plugins.load(component)
    with blame(component, "to build"):
        built = cls(options, **context)
    if component.kind == "schedule":
        with blame(component, "to give its betas"):
            from ddpmkit.interfaces import check_betas

            check_betas(built.betas.double(), built.num_timesteps)
    if component.kind == "denoiser":
        from ddpmkit.diffusion import PREDICTIONS

        if getattr(built, "prediction", None) not in PREDICTIONS:
            raise PluginCodeError(
                f"{component.label} declares prediction = {getattr(built, 'prediction', None)!r}; "
                f"ddpmkit knows {', '.join(PREDICTIONS)}"
            )
    return built


def create_schedule(name: str, **options: Any) -> NoiseSchedule:
    """Build the noise schedule registered as ``name`` (or ``DISTRIBUTION:NAME``) with the given options."""
    comp = plugins.find("schedule", name)
    return construct(comp, validate_options(comp, options))


def create_denoiser(
    name: str, *, image_shape: tuple[int, int, int], num_timesteps: int, num_classes: int = 0, **options: Any
) -> Denoiser:
    """Build the denoiser registered as ``name`` for images of ``image_shape`` (C, H, W) and T steps; with
    ``num_classes``, class-conditional (for a denoiser that declares ``conditions = {"class"}``)."""
    comp = plugins.find("denoiser", name)
    extra = {"num_classes": num_classes} if num_classes else {}
    return construct(
        comp, validate_options(comp, options), image_shape=tuple(image_shape), num_timesteps=num_timesteps, **extra
    )


def create_sampler(name: str, **options: Any) -> Sampler:
    """Build the sampler registered as ``name`` with the given options."""
    comp = plugins.find("sampler", name)
    return construct(comp, validate_options(comp, options))


def create_objective(
    name: str, *, schedule: NoiseSchedule | None = None, prediction: str = "epsilon", **options: Any
) -> Objective:
    """Build the objective registered as ``name`` with the given options; ``schedule`` and ``prediction`` are read
    by an objective that takes them (``ddpm``: the run's schedule, the denoiser's target)."""
    comp = plugins.find("objective", name)
    return construct(comp, validate_options(comp, options), schedule=schedule, prediction=prediction)
