"""ddpmkit: a plugin-based toolkit for Denoising Diffusion Probabilistic Models.

Importing ddpmkit is cheap: torch is imported only when a component is built or a run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, DataError, DdpmkitError, DdpmkitWarning, PluginCodeError, PluginError
from .factory import create_denoiser, create_sampler, create_schedule
from .hookspecs import PLUGIN_API_VERSION, Register, hookimpl
from .plugins import list_plugins

__version__ = "0.4.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DdpmkitError",
    "DdpmkitWarning",
    "Denoiser",
    "NoiseSchedule",
    "PLUGIN_API_VERSION",
    "PluginCodeError",
    "PluginError",
    "Register",
    "ReverseStepSampler",
    "Sampler",
    "create_denoiser",
    "create_sampler",
    "create_schedule",
    "hookimpl",
    "list_plugins",
    "load_config",
]

if TYPE_CHECKING:  # imported lazily at run time (they need torch)
    from .interfaces import Denoiser, NoiseSchedule, ReverseStepSampler, Sampler

_LAZY = {name: "interfaces" for name in ("NoiseSchedule", "Denoiser", "Sampler", "ReverseStepSampler")}


def load_config(path: Any, overrides: list[str] | None = None):
    """Read and validate a run config from a TOML file (see :mod:`ddpmkit.config`)."""
    from .config import load_config as _load

    return _load(path, overrides)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")
