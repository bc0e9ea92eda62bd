"""Build components by name: look up the plugin, validate options with its model, construct."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from . import plugins
from .errors import ConfigError


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted key path (``prefix.key``)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def validate_options(kind: str, name: str, options: Mapping[str, Any], prefix: str = "") -> BaseModel:
    """Validate ``options`` with the Options model of component ``name``; ConfigError names the key."""
    model = plugins.options_model(kind, name)
    if isinstance(options, model):
        return options
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix or f"{kind}.options")) from None


def create_schedule(name: str, **options: Any):
    """Build the noise schedule registered as ``name`` with the given options."""
    cls = plugins.resolve("schedule", name)
    return cls(validate_options("schedule", name, options))


def create_denoiser(name: str, *, image_shape: tuple[int, int, int], num_timesteps: int, **options: Any):
    """Build the denoiser registered as ``name`` for images of ``image_shape`` (C, H, W) and T steps."""
    cls = plugins.resolve("denoiser", name)
    opts = validate_options("denoiser", name, options)
    return cls(opts, image_shape=tuple(image_shape), num_timesteps=num_timesteps)


def create_sampler(name: str, **options: Any):
    """Build the sampler registered as ``name`` with the given options."""
    cls = plugins.resolve("sampler", name)
    return cls(validate_options("sampler", name, options))
