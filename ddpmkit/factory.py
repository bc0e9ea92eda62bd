"""Build components by name: look up the plugin, validate options with its model, construct."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from pydantic import BaseModel, ValidationError

from . import plugins
from .errors import ConfigError
from .validation import problems

if TYPE_CHECKING:
    from .config import RunConfig


def validate_options(kind: str, name: str, options: Mapping[str, Any], prefix: str = "") -> BaseModel:
    """Validate ``options`` with the Options model of component ``name``; ConfigError names the key."""
    model = plugins.options_model(kind, name)
    if isinstance(options, model):
        return options
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        where = tuple((prefix or f"{kind}.options").split("."))
        raise ConfigError("; ".join(f"{key}: {msg}" for key, msg in problems(exc, model, where))) from None


def create_schedule(name: str, **options: Any):
    """Build the noise schedule registered as ``name`` with the given options."""
    cls = plugins.resolve("schedule", name)
    return cls(validate_options("schedule", name, options))


def create_denoiser(name: str, *, image_shape: tuple[int, int, int], num_timesteps: int, **options: Any):
    """Build the denoiser registered as ``name`` for images of ``image_shape`` (C, H, W) and T steps."""
    cls = plugins.resolve("denoiser", name)
    opts = validate_options("denoiser", name, options)
    return cls(opts, image_shape=tuple(image_shape), num_timesteps=num_timesteps)


def denoiser_from_config(cfg: "RunConfig"):
    """The denoiser a run config describes (image shape and T included), freshly initialised."""
    return create_denoiser(
        cfg.denoiser.name, image_shape=cfg.image_shape, num_timesteps=cfg.num_timesteps, **cfg.denoiser.options
    )


def create_sampler(name: str, **options: Any):
    """Build the sampler registered as ``name`` with the given options."""
    cls = plugins.resolve("sampler", name)
    return cls(validate_options("sampler", name, options))
