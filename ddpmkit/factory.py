"""Building components: look each up once, validate its options once, construct it, and check it works.

:func:`build_components` is the one place a run, ``sample`` and ``validate`` get their schedule,
denoiser and sampler from; ``create_*`` are the same steps for one component, from Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from pydantic import BaseModel, ValidationError

from . import plugins
from .blame import blame
from .limits import check_fits
from .errors import ConfigError, PluginCodeError
from .kinds import KINDS
from .validation import problems

if TYPE_CHECKING:
    from .config import RunConfig
    from .interfaces import Denoiser, NoiseSchedule, Sampler
    from .plugins import Component


def validate_options(component: "Component", options: Mapping[str, Any] | BaseModel, prefix: str = "") -> BaseModel:
    """Validate ``options`` with the Options model of ``component``; ConfigError names the key."""
    model = plugins.load(component).Options
    if isinstance(options, model):
        return options
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        where = tuple((prefix or f"{component.kind}.options").split("."))
        raise ConfigError("; ".join(f"{key}: {msg}" for key, msg in problems(exc, model, where))) from None


def construct(component: "Component", options: BaseModel, **context: Any) -> Any:
    """``cls(options, **context)`` for ``component``, with any failure reported as one line naming it."""
    cls = plugins.load(component)
    with blame(component, "to build"):
        built = cls(options, **context)
    if component.kind == "schedule":
        with blame(component, "to give its betas"):
            from .interfaces import check_betas

            check_betas(built.betas.double(), built.num_timesteps)
    if component.kind == "denoiser":
        from .diffusion import PREDICTIONS

        if getattr(built, "prediction", None) not in PREDICTIONS:
            raise PluginCodeError(
                f"{component.label} declares prediction = {getattr(built, 'prediction', None)!r}; "
                f"ddpmkit knows {', '.join(PREDICTIONS)}"
            )
    return built


def create_schedule(name: str, **options: Any) -> "NoiseSchedule":
    """Build the noise schedule registered as ``name`` (or ``DISTRIBUTION:NAME``) with the given options."""
    comp = plugins.find("schedule", name)
    return construct(comp, validate_options(comp, options))


def create_denoiser(name: str, *, image_shape: tuple[int, int, int], num_timesteps: int, **options: Any) -> "Denoiser":
    """Build the denoiser registered as ``name`` for images of ``image_shape`` (C, H, W) and T steps."""
    comp = plugins.find("denoiser", name)
    return construct(comp, validate_options(comp, options), image_shape=tuple(image_shape), num_timesteps=num_timesteps)


def create_sampler(name: str, **options: Any) -> "Sampler":
    """Build the sampler registered as ``name`` with the given options."""
    comp = plugins.find("sampler", name)
    return construct(comp, validate_options(comp, options))


@dataclass
class Components:
    """What a run config builds, with the registry entry each came from."""

    schedule: "NoiseSchedule"
    denoiser: "Denoiser"
    sampler: "Sampler"
    refs: dict[str, "Component"]

    def timesteps(self) -> list[int]:
        """The t the sampler visits under this schedule, checked to lie in [0, T)."""
        comp = self.refs["sampler"]
        with blame(comp, "to list its steps"):
            steps = [int(t) for t in self.sampler.timesteps(self.schedule)]
        T = self.schedule.num_timesteps
        if not steps or any(not 0 <= t < T for t in steps):
            raise PluginCodeError(f"{comp.label} lists steps outside [0, {T}): {steps[:5]}...")
        return steps


def build_components(cfg: "RunConfig") -> Components:
    """The schedule, denoiser (freshly initialised, on the CPU) and sampler a validated run config names."""
    refs = {kind: cfg.component(kind) for kind in KINDS}
    # the schedule's derived tables: about 16 float64 arrays of length T
    check_fits(cfg.num_timesteps * 16 * 8, f"schedule.options.num_timesteps = {cfg.num_timesteps:,}",
               "DDPMs use about 1,000 steps")
    c, h, w = cfg.image_shape  # a forward pass holds many activations the size of the image: 64 is a floor
    check_fits(c * h * w * 4 * 64, f"data.image_size = {cfg.data.image_size}", "choose a smaller data.image_size")
    schedule = construct(refs["schedule"], cfg.component_options("schedule"))
    denoiser = construct(
        refs["denoiser"], cfg.component_options("denoiser"), image_shape=cfg.image_shape, num_timesteps=cfg.num_timesteps
    )
    sampler = construct(refs["sampler"], cfg.component_options("sampler"))
    return Components(schedule, denoiser, sampler, refs)


def build_checked(cfg: "RunConfig") -> Components:
    """Build every component (the denoiser initialised from ``run.seed``) and run :func:`smoke_test`, so that
    errors in a plugin's code surface as one line naming it, before any training."""
    import torch

    torch.manual_seed(cfg.run.seed)
    built = build_components(cfg)
    smoke_test(built, cfg.image_shape)
    return built


def smoke_test(built: Components, image_shape: tuple[int, int, int]) -> None:
    """One tiny forward pass of the denoiser on the CPU (two images, the first and last t) and the
    sampler's step list, so that shape, NaN and plugin errors show before any training."""
    import torch

    from .diffusion import denoise

    built.timesteps()
    denoiser, comp = built.denoiser, built.refs["denoiser"]
    T = built.schedule.num_timesteps
    x = torch.randn((2, *image_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([T - 1, 0])
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.no_grad(), blame(comp, "a forward pass"):
            out = denoise(denoiser, x.to(denoiser.device), t.to(denoiser.device))
            if not torch.isfinite(out).all():
                raise ValueError("forward returned non-finite values for finite input")
    finally:
        denoiser.train(was_training)

