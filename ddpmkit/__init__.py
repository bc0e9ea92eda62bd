"""ddpmkit: a plugin-based toolkit for Denoising Diffusion Probabilistic Models.

The front door: ``train`` a run, ``load_run`` a trained one and draw from it, ``save_images`` what it drew.
Importing ddpmkit is cheap: torch is imported only when a component is built, a run is
loaded or a run starts. For plugin authors: :mod:`ddpmkit.interfaces`, :mod:`ddpmkit.diffusion`,
:mod:`ddpmkit.errors`, :mod:`ddpmkit.testing` and ``ddpmkit.hookimpl``; the map of the package is
``docs/architecture.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ddpmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DdpmkitError,
    DdpmkitWarning,
    PluginCodeError,
    PluginError,
)
from ddpmkit.hookspecs import METRICS_FILE, PLUGIN_API_VERSION, Register, hookimpl
from ddpmkit.version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DdpmkitError",
    "DdpmkitWarning",
    "Denoiser",
    "LoadedRun",
    "METRICS_FILE",
    "NoiseSchedule",
    "Objective",
    "PLUGIN_API_VERSION",
    "PluginCodeError",
    "PluginError",
    "Register",
    "ReverseStepSampler",
    "Sampler",
    "__version__",
    "create_denoiser",
    "create_objective",
    "create_sampler",
    "create_schedule",
    "hookimpl",
    "list_plugins",
    "load_config",
    "load_run",
    "save_images",
    "train",
]

if TYPE_CHECKING:
    from ddpmkit.interfaces import Denoiser, NoiseSchedule, Objective, ReverseStepSampler, Sampler
    from ddpmkit.registry.build import create_denoiser, create_objective, create_sampler, create_schedule
    from ddpmkit.registry.discovery import list_plugins
    from ddpmkit.run.config import load_config
    from ddpmkit.sampling.images import save_images
    from ddpmkit.sampling.loaded import LoadedRun, load_run
    from ddpmkit.training.trainer import train

#: name -> the module that defines it; imported on first use (most need torch)
_LAZY = {
    **{
        name: "ddpmkit.interfaces"
        for name in ("NoiseSchedule", "Denoiser", "Sampler", "ReverseStepSampler", "Objective")
    },
    **{
        name: "ddpmkit.registry.build"
        for name in ("create_schedule", "create_denoiser", "create_sampler", "create_objective")
    },
    "list_plugins": "ddpmkit.registry.discovery",
    "load_config": "ddpmkit.run.config",
    "load_run": "ddpmkit.sampling.loaded",
    "LoadedRun": "ddpmkit.sampling.loaded",
    "save_images": "ddpmkit.sampling.images",
    "train": "ddpmkit.training.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
