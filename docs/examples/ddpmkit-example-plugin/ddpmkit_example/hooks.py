"""The plugin module named by this distribution's ``ddpmkit`` entry point.

Components are registered as lazy ``"module:attr"`` strings: importing this module (which
``ddpmkit list-plugins`` does) must stay cheap, so it never imports torch or the components.
"""

from __future__ import annotations

from ddpmkit import Register, hookimpl

#: The ddpmkit plugin API versions this plugin was written for.
DDPMKIT_PLUGIN_API = [1]


@hookimpl
def register_schedules(register: Register) -> None:
    """Register the ``sigmoid`` noise schedule."""
    register("sigmoid", "ddpmkit_example.sigmoid:SigmoidSchedule")


@hookimpl
def register_denoisers(register: Register) -> None:
    """Register the ``resconv`` denoiser."""
    register("resconv", "ddpmkit_example.resconv:ResConv")
