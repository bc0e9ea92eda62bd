"""Plugin discovery: entry points in the group ``ddpmkit``, guarded loading, the registry of names.

Nothing here imports torch: components are registered as classes or lazy ``"module:attr"``
strings, and a lazy target is imported only when that component is built.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "ddpmkit"
#: Set to 1 to load only the plugins that ship with ddpmkit itself.
DISABLE_ENV = "DDPMKIT_NO_THIRD_PARTY_PLUGINS"
KIND_HOOKS = {
    "schedule": "register_schedules",
    "denoiser": "register_denoisers",
    "sampler": "register_samplers",
}
OWN_DISTRIBUTION = "ddpmkit"


@dataclass
class Plugin:
    """One plugin module, as found through an entry point."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    status: str = "ok"  # ok | error
    error: str | None = None


@dataclass
class Component:
    """One registered schedule, denoiser or sampler."""

    kind: str
    name: str
    target: Any
    plugin: Plugin
    clashes_with: list[Plugin] = field(default_factory=list)

    @property
    def target_path(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"


@dataclass
class Registry:
    plugins: list[Plugin]
    components: list[Component]
    manager: pluggy.PluginManager | None = None

    def named(self, kind: str, name: str) -> list[Component]:
        return [c for c in self.components if c.kind == kind and c.name == name]

    def names(self, kind: str) -> list[str]:
        return sorted({c.name for c in self.components if c.kind == kind})

    def broken(self) -> list[Plugin]:
        return [p for p in self.plugins if p.status != "ok"]


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _entry_points() -> list[metadata.EntryPoint]:
    """The group's entry points, each once even when a distribution is found twice on sys.path."""
    seen: set[tuple[str | None, str, str]] = set()
    unique = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else None
        key = (dist, ep.name, ep.value)
        if key in seen:
            continue
        seen.add(key)
        unique.append(ep)
    return unique


def _third_party_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def discover() -> Registry:
    """Load every plugin module and collect what each registers; a failing plugin is recorded, not raised."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    plugins: list[Plugin] = []
    by_module: dict[int, Plugin] = {}
    for ep in _entry_points():
        dist_name = ep.dist.metadata["Name"] if ep.dist is not None else None
        if _third_party_disabled() and dist_name != OWN_DISTRIBUTION:
            continue
        plugin = Plugin(ep.name, ep.value, dist_name, ep.dist.version if ep.dist is not None else None)
        plugins.append(plugin)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            plugin.status, plugin.error = "error", _describe_error(exc)
            continue
        incompatible = _api_mismatch(module)
        if incompatible:
            plugin.status, plugin.error = "incompatible", incompatible
            continue
        try:
            pm.register(module, name=f"{dist_name}:{ep.name}")
        except Exception as exc:  # e.g. a hookimpl that matches no hook specification
            plugin.status, plugin.error = "error", _describe_error(exc)
            continue
        by_module[id(module)] = plugin

    components: list[Component] = []
    for kind, hook_name in KIND_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = by_module[id(impl.plugin)]

            def register(name: str, target: Any, _kind: str = kind, _plugin: Plugin = plugin) -> None:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"component name must be a non-empty string, got {name!r}")
                if not (isinstance(target, type) or (isinstance(target, str) and ":" in target)):
                    raise TypeError(f"target for {name!r} must be a class or a 'module:attr' string")
                components.append(Component(_kind, name, target, _plugin))

            try:
                impl.function(register=register)
            except Exception as exc:
                plugin.status, plugin.error = "error", _describe_error(exc)

    _mark_clashes(components)
    return Registry(plugins, components, pm)


def _api_mismatch(module: Any) -> str | None:
    """Why a plugin module's declared ``DDPMKIT_PLUGIN_API`` rules it out, or None if it fits."""
    from .hookspecs import PLUGIN_API_VERSION

    declared = getattr(module, "DDPMKIT_PLUGIN_API", None)
    if declared is None:
        return None
    supported = {declared} if isinstance(declared, int) else set(declared) if isinstance(declared, (list, tuple, set)) else None
    if supported is None:
        return f"DDPMKIT_PLUGIN_API must be an int or a list of ints, got {declared!r}"
    if PLUGIN_API_VERSION not in supported:
        return (
            f"built for plugin API {sorted(supported)}; this ddpmkit speaks plugin API {PLUGIN_API_VERSION} "
            "(upgrade the plugin or pin a matching ddpmkit)"
        )
    return None


def _mark_clashes(components: list[Component]) -> None:
    for comp in components:
        comp.clashes_with = [
            other.plugin for other in components if other is not comp and other.kind == comp.kind and other.name == comp.name
        ]


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    return discover()


def reset() -> None:
    """Forget the discovered registry (tests, or after installing a plugin at run time)."""
    registry.cache_clear()


def _plugin_label(plugin: Plugin) -> str:
    where = f" ({plugin.distribution} {plugin.version})" if plugin.distribution else ""
    return f"'{plugin.name}'{where}"


def find(kind: str, name: str) -> Component:
    """The component registered as ``name``; PluginError if it is unknown or ambiguous."""
    if kind not in KIND_HOOKS:
        raise ValueError(f"unknown component kind {kind!r}")
    reg = registry()
    found = reg.named(kind, name)
    if not found:
        available = ", ".join(reg.names(kind)) or "none"
        message = f"unknown {kind} '{name}'; installed: {available}"
        broken = reg.broken()
        if broken:
            message += "; plugins that failed to load: " + "; ".join(
                f"{_plugin_label(p)}: {p.error}" for p in broken
            )
        raise PluginError(message)
    if len(found) > 1:
        owners = ", ".join(_plugin_label(c.plugin) for c in found)
        raise PluginError(f"{kind} '{name}' is registered by several plugins: {owners}; uninstall all but one")
    if found[0].plugin.status == "error":  # registered before one of the plugin's hooks raised
        raise PluginError(
            f"{kind} '{name}' comes from plugin {_plugin_label(found[0].plugin)}, which failed to load: "
            f"{found[0].plugin.error}"
        )
    return found[0]


def resolve(kind: str, name: str) -> type:
    """The class of the component ``name``, importing a lazy target now."""
    comp = find(kind, name)
    target = comp.target
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            raise PluginError(
                f"{kind} '{name}' from plugin {_plugin_label(comp.plugin)} failed to load "
                f"({target}): {_describe_error(exc)}"
            ) from exc
    from .interfaces import KINDS  # torch is needed from here on anyway

    base = KINDS[kind]
    if not (isinstance(target, type) and issubclass(target, base)):
        raise PluginError(
            f"{kind} '{name}' from plugin {_plugin_label(comp.plugin)} is not a {base.__name__} subclass"
        )
    return target


def options_model(kind: str, name: str) -> type:
    """The pydantic Options model of the component ``name``."""
    return resolve(kind, name).Options


EVENT_HOOKS = ("train_start", "step_end", "checkpoint_written", "samples_written", "train_end")


def event_plugins(reg: Registry) -> list[tuple[Plugin, list[str]]]:
    """Loaded plugins that implement training-event hooks, with the hooks each implements."""
    if reg.manager is None:
        return []
    by_name = {f"{p.distribution}:{p.name}": p for p in reg.plugins}
    found: dict[str, list[str]] = {}
    for hook in EVENT_HOOKS:
        for impl in getattr(reg.manager.hook, hook).get_hookimpls():
            found.setdefault(impl.plugin_name, []).append(hook)
    return [(by_name[name], hooks) for name, hooks in found.items() if name in by_name]


def list_plugins() -> list[dict[str, Any]]:
    """One row per registered component, plus one per plugin that failed to load."""
    reg = registry()
    rows: list[dict[str, Any]] = []
    for comp in sorted(reg.components, key=lambda c: (list(KIND_HOOKS).index(c.kind), c.name)):
        status, error = comp.plugin.status, comp.plugin.error
        if comp.clashes_with and status == "ok":
            status = "clash"
            error = "also registered by " + ", ".join(_plugin_label(p) for p in comp.clashes_with)
        rows.append(
            {
                "kind": comp.kind,
                "name": comp.name,
                "plugin": comp.plugin.name,
                "distribution": comp.plugin.distribution,
                "version": comp.plugin.version,
                "status": status,
                "error": error,
                "target": comp.target_path,
            }
        )
    for plugin, hooks in event_plugins(reg):
        rows.append(
            {
                "kind": "events",
                "name": plugin.name,
                "plugin": plugin.name,
                "distribution": plugin.distribution,
                "version": plugin.version,
                "status": plugin.status,
                "error": None,
                "target": plugin.module + " (" + ", ".join(hooks) + ")",
            }
        )
    for plugin in reg.broken():
        if any(c.plugin is plugin for c in reg.components):
            continue
        rows.append(
            {
                "kind": None,
                "name": None,
                "plugin": plugin.name,
                "distribution": plugin.distribution,
                "version": plugin.version,
                "status": plugin.status,
                "error": plugin.error,
                "target": plugin.module,
            }
        )
    return rows
