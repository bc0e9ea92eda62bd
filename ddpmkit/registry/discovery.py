"""Plugin discovery: entry points in the group ``ddpmkit``, guarded loading, the registry of names.

Nothing here imports torch: components are registered as classes or lazy ``"module:attr"``
strings, and a lazy target is imported only when that component is built.

Every component has a qualified name ``DISTRIBUTION:NAME`` (``ddpmkit:linear``) that no other
package can take. A plain name registered by several plugins resolves to ddpmkit's own component
(with a warning naming the others); between two third parties it is an error listing the
qualified names.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from ddpmkit import hookspecs
from ddpmkit.errors import DdpmkitWarning, PluginError
from ddpmkit.extras import EXTRAS, NEEDED_BY, install_hint, is_missing
from ddpmkit.kinds import EVENTS, KINDS, REGISTER_HOOKS, base_class, check_kind

ENTRY_POINT_GROUP = "ddpmkit"
#: Set to 1 to load only the plugins that ship with ddpmkit itself.
DISABLE_ENV = "DDPMKIT_NO_THIRD_PARTY_PLUGINS"
OWN_DISTRIBUTION = "ddpmkit"
EVENT_HOOKS = ("train_start", "step_end", "checkpoint_written", "samples_written", "train_end", "evaluated")


def normalize(distribution: str) -> str:
    """PEP 503 normalisation: ``Ddpmkit_Cosine`` and ``ddpmkit-cosine`` name one distribution."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


@dataclass
class Plugin:
    """One plugin module, as found through an entry point (or registered in-process)."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    status: str = "ok"  # ok | error | incompatible
    error: str | None = None
    module_object: ModuleType | None = field(default=None, repr=False)

    @property
    def qualified(self) -> str:
        """``DISTRIBUTION:ENTRY_POINT``, the plugin's name that nothing else can take."""
        return f"{self.distribution or self.name}:{self.name}"

    @property
    def label(self) -> str:
        """``'name' (distribution version)``, for messages."""
        where = f" ({self.distribution} {self.version})" if self.distribution else ""
        return f"'{self.name}'{where}"

    @property
    def options_model(self) -> type | None:
        """The pydantic model of the plugin's ``[plugins.<name>]`` table (its module's ``Options``), if any."""
        from pydantic import BaseModel

        model = getattr(self.module_object, "Options", None)
        return model if isinstance(model, type) and issubclass(model, BaseModel) else None


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

    @property
    def qualified(self) -> str:
        """``DISTRIBUTION:NAME``: accepted wherever a name is, and stored in checkpoints."""
        return f"{self.plugin.distribution or self.plugin.name}:{self.name}"

    @property
    def is_own(self) -> bool:
        return self.plugin.distribution == OWN_DISTRIBUTION

    @property
    def label(self) -> str:
        """``denoiser 'unet' (plugin 'builtin', ddpmkit 0.4.0)``, for messages."""
        where = f", {self.plugin.distribution} {self.plugin.version}" if self.plugin.distribution else ""
        return f"{self.kind} '{self.name}' (plugin '{self.plugin.name}'{where})"


@dataclass
class Registry:
    plugins: list[Plugin]
    components: list[Component]
    manager: pluggy.PluginManager | None = None
    warned: set[tuple[str, str]] = field(default_factory=set)

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


#: Plugin modules registered in-process (tests, notebooks): (module, entry-point name, distribution, version).
_in_process: list[tuple[ModuleType, str, str | None, str | None]] = []


def register_module(module: ModuleType, name: str, distribution: str | None = None, version: str | None = None) -> None:
    """Add a plugin module without installing a distribution (as if an entry point named it); rediscovers."""
    _in_process.append((module, name, distribution, version))
    reset()


def unregister_module(module: ModuleType) -> None:
    """Forget a module added with :func:`register_module`; rediscovers."""
    _in_process[:] = [entry for entry in _in_process if entry[0] is not module]
    reset()


def discover() -> Registry:
    """Load every plugin module and collect what each registers; a failing plugin is recorded, not raised."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    plugins: list[Plugin] = []
    by_module: dict[int, Plugin] = {}

    def add(plugin: Plugin, load: Any) -> None:
        plugins.append(plugin)
        try:
            module = load()
        except Exception as exc:  # a broken plugin must not break the others
            plugin.status, plugin.error = "error", _describe_error(exc)
            return
        plugin.module_object = module
        incompatible = _api_mismatch(module)
        if incompatible:
            plugin.status, plugin.error = "incompatible", incompatible
            return
        try:
            pm.register(module, name=plugin.qualified)
        except Exception as exc:  # e.g. a hookimpl that matches no hook specification
            plugin.status, plugin.error = "error", _describe_error(exc)
            return
        by_module[id(module)] = plugin

    for ep in _entry_points():
        dist_name = ep.dist.metadata["Name"] if ep.dist is not None else None
        if _third_party_disabled() and dist_name != OWN_DISTRIBUTION:
            continue
        add(Plugin(ep.name, ep.value, dist_name, ep.dist.version if ep.dist is not None else None), ep.load)
    for module, name, dist_name, version in _in_process:
        add(Plugin(name, module.__name__, dist_name, version), lambda m=module: m)

    components: list[Component] = []
    for kind, hook_name in REGISTER_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = by_module[id(impl.plugin)]

            def register(name: str, target: Any, _kind: str = kind, _plugin: Plugin = plugin) -> None:
                if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                    raise TypeError(f"component name must be letters, digits, '.', '_' or '-' (no ':'), got {name!r}")
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
    declared = getattr(module, "DDPMKIT_PLUGIN_API", None)
    if declared is None:
        return None
    supported = (
        {declared} if isinstance(declared, int) else set(declared) if isinstance(declared, (list, tuple, set)) else None
    )
    if supported is None:
        return f"DDPMKIT_PLUGIN_API must be an int or a list of ints, got {declared!r}"
    if not supported & set(hookspecs.SUPPORTED_PLUGIN_APIS):
        speaks = ", ".join(map(str, hookspecs.SUPPORTED_PLUGIN_APIS))
        return (
            f"built for plugin API {sorted(supported)}; this ddpmkit speaks plugin API {speaks} "
            "(upgrade the plugin or pin a matching ddpmkit)"
        )
    return None


def _mark_clashes(components: list[Component]) -> None:
    for comp in components:
        comp.clashes_with = [
            other.plugin
            for other in components
            if other is not comp and other.kind == comp.kind and other.name == comp.name
        ]


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    return discover()


def reset() -> None:
    """Forget the discovered registry (tests, or after installing a plugin at run time)."""
    registry.cache_clear()


def _unknown(kind: str, name: str, reg: Registry) -> PluginError:
    available = ", ".join(reg.names(kind)) or "none"
    message = f"unknown {kind} '{name}'; installed: {available}"
    broken = reg.broken()
    if broken:
        message += "; plugins that failed to load: " + "; ".join(f"{p.label}: {p.error}" for p in broken)
    return PluginError(message)


def find(kind: str, name: str) -> Component:
    """The component registered as ``name`` or ``DISTRIBUTION:NAME``; PluginError if unknown or ambiguous."""
    check_kind(kind)
    reg = registry()
    dist, qualified, short = name.rpartition(":")
    candidates = reg.named(kind, short)
    if qualified:
        found = [c for c in candidates if normalize(c.plugin.distribution or c.plugin.name) == normalize(dist)]
        if not found:
            if candidates:
                choices = ", ".join(sorted(c.qualified for c in candidates))
                raise PluginError(f"no {kind} '{name}': '{short}' comes from {choices}")
            raise _unknown(kind, name, reg)
    else:
        found = candidates
        if not found:
            raise _unknown(kind, name, reg)
        if len(found) > 1:
            own = [c for c in found if c.is_own]
            if len(own) != 1:
                choices = ", ".join(sorted(c.qualified for c in found))
                raise PluginError(f"{kind} '{name}' is registered by several plugins; name one of {choices}")
            if (kind, name) not in reg.warned:
                reg.warned.add((kind, name))
                others = ", ".join(f"{c.plugin.label} as {c.qualified}" for c in found if not c.is_own)
                warnings.warn(
                    f"{kind} '{name}' is also registered by {others}; using ddpmkit's own "
                    f"({own[0].qualified}). Write the qualified name to use the other.",
                    DdpmkitWarning,
                    stacklevel=2,
                )
            found = own
    if len(found) > 1:
        owners = ", ".join(f"{c.plugin.label}" for c in found)
        raise PluginError(f"{kind} '{name}' is registered by several plugins of one distribution: {owners}")
    comp = found[0]
    if comp.plugin.status == "error":  # registered before one of the plugin's hooks raised
        raise PluginError(
            f"{kind} '{name}' comes from plugin {comp.plugin.label}, which failed to load: {comp.plugin.error}"
        )
    return comp


def load(comp: Component) -> type:
    """The class of ``comp``, importing a lazy target now; PluginError if it is not a subclass of its kind's base."""
    target = comp.target
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            raise PluginError(f"{comp.label} failed to load ({target}): {_describe_error(exc)}") from exc
    base = base_class(comp.kind)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise PluginError(f"{comp.label} is not a {base.__name__} subclass")
    return target


def resolve(kind: str, name: str) -> type:
    """The class of the component ``name``, importing a lazy target now."""
    return load(find(kind, name))


# --- plugins as a whole: event hooks and their options -------------------------------------------------


def find_plugin(name: str) -> Plugin:
    """The loaded plugin whose entry point is ``name`` (or ``DISTRIBUTION:NAME``); PluginError otherwise."""
    reg = registry()
    dist, qualified, short = name.rpartition(":")
    found = [
        p
        for p in reg.plugins
        if p.name == short and (not qualified or normalize(p.distribution or p.name) == normalize(dist))
    ]
    if not found:
        names = ", ".join(sorted({p.name for p in reg.plugins})) or "none"
        raise PluginError(f"no plugin named '{name}'; installed plugins: {names}")
    if len(found) > 1:
        raise PluginError(f"several plugins are named '{name}'; use one of {', '.join(p.qualified for p in found)}")
    if found[0].status != "ok":
        raise PluginError(f"plugin {found[0].label} did not load: {found[0].error}")
    return found[0]


def event_plugins(reg: Registry) -> list[tuple[Plugin, list[str]]]:
    """Loaded plugins that implement training-event hooks, with the hooks each implements."""
    if reg.manager is None:
        return []
    by_name = {p.qualified: p for p in reg.plugins}
    found: dict[str, list[str]] = {}
    for hook in EVENT_HOOKS:
        for impl in getattr(reg.manager.hook, hook).get_hookimpls():
            found.setdefault(impl.plugin_name, []).append(hook)
    return [(by_name[name], hooks) for name, hooks in found.items() if name in by_name]


def _row(
    kind: str | None,
    name: str | None,
    qualified: str | None,
    plugin: Plugin,
    status: str,
    error: str | None,
    target: str,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": name,
        "qualified_name": qualified,
        "plugin": plugin.name,
        "distribution": plugin.distribution,
        "version": plugin.version,
        "status": status,
        "error": error,
        "target": target,
    }


def list_plugins() -> list[dict[str, Any]]:
    """One row per registered component and event plugin, plus one per plugin that failed to load."""
    reg = registry()
    rows: list[dict[str, Any]] = []
    for comp in sorted(reg.components, key=lambda c: (KINDS.index(c.kind), c.name, not c.is_own, c.qualified)):
        status, error = comp.plugin.status, comp.plugin.error
        if comp.clashes_with and status == "ok":
            others = ", ".join(p.label for p in comp.clashes_with)
            own_wins = any(p.distribution == OWN_DISTRIBUTION for p in comp.clashes_with) and not comp.is_own
            if comp.is_own:
                error = f"also registered by {others}; the plain name means this one"
            elif own_wins:
                status, error = "shadowed", f"ddpmkit's own '{comp.name}' takes the plain name; use {comp.qualified}"
            else:
                status, error = "clash", f"also registered by {others}; use {comp.qualified}"
        rows.append(_row(comp.kind, comp.name, comp.qualified, comp.plugin, status, error, comp.target_path))
    for plugin, hooks in event_plugins(reg):
        rows.append(
            _row(
                EVENTS,
                plugin.name,
                plugin.qualified,
                plugin,
                plugin.status,
                None,
                plugin.module + " (" + ", ".join(hooks) + ")",
            )
        )
    for plugin in reg.broken():
        if any(c.plugin is plugin for c in reg.components):
            continue
        rows.append(_row(None, None, None, plugin, plugin.status, plugin.error, plugin.module))
    for row in rows:  # ddpmkit's own components that need an optional extra say which, while it is missing
        extra = NEEDED_BY.get(row["qualified_name"] or "")
        if extra and row["status"] == "ok" and is_missing(extra):
            row["status"], row["error"] = "needs extra", f"needs {EXTRAS[extra][0]}: {install_hint(extra)}"
    return rows
