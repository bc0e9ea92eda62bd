"""Training events: calling every plugin's event hooks with its own options, and stopping cleanly when one fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpmkit.errors import DdpmkitError, HookFailed
from ddpmkit.registry import discovery as plugins
from ddpmkit.registry.blame import one_line
from ddpmkit.run.config import RunConfig


@dataclass
class RunInfo:
    """What an event hook learns about the run."""

    run_dir: Path
    config: RunConfig
    device: str
    start_step: int
    total_steps: int


class EventDispatcher:
    """Calls one event hook of every loaded plugin, each with only the arguments it asks for.

    ``options`` is the plugin's validated ``[plugins.<name>]`` table (see ``RunConfig.plugin_options``).
    """

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        reg = plugins.registry()
        self.manager = reg.manager
        self.plugins = {p.qualified: p for p in reg.plugins}

    def emit(self, hook: str, **kwargs: Any) -> None:
        if self.manager is None:
            return
        failure: HookFailed | None = None
        # pluggy calls later-registered plugins first; call in registration order instead, and call
        # every plugin even when one fails, so that one broken logger does not silence the others
        for impl in reversed(getattr(self.manager.hook, hook).get_hookimpls()):
            plugin = self.plugins.get(impl.plugin_name)
            args = {**kwargs, "run": self.run}
            try:
                args["options"] = self.run.config.plugin_options(plugin) if plugin is not None else None
                impl.function(*[args[name] for name in impl.argnames])
            except Exception as exc:
                if failure is None:
                    failure = self._failure(hook, plugin, impl.plugin_name, exc)
        if failure is not None:
            raise failure

    @staticmethod
    def _failure(hook: str, plugin: plugins.Plugin | None, plugin_name: str, exc: Exception) -> HookFailed:
        who = plugin.label if plugin is not None else plugin_name
        if isinstance(exc, DdpmkitError):  # the plugin's own clear message about user input
            failed = HookFailed(f"plugin {who}: {exc}")
        else:
            failed = HookFailed(f"event hook {hook} of plugin {who} failed: {one_line(exc)}")
        failed.__cause__ = exc
        return failed
