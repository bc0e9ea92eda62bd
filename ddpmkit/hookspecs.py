"""Pluggy hook specifications: what a ddpmkit plugin module may implement.

A plugin is a module named by an entry point in the group ``ddpmkit``; it implements any of
these hooks with ``@ddpmkit.hookimpl``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "ddpmkit"

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
