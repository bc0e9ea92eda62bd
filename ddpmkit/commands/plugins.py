"""``ddpmkit list-plugins``, ``describe`` and ``check-plugins``: what is installed, what it takes, and whether it
conforms."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from ddpmkit.commands.app import JsonOption, app, console, err_console, print_table, user_errors


@app.command("list-plugins")
@user_errors
def list_plugins_cmd(as_json: bool = JsonOption) -> None:
    """Show the installed noise schedules, denoisers and samplers, and plugins that failed to load."""
    from ddpmkit.registry.discovery import list_plugins

    rows = list_plugins()
    if as_json:
        keys = ("kind", "name", "qualified_name", "plugin", "distribution", "version", "status", "error")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        return
    table = Table(title="ddpmkit plugins")
    styles = {
        "ok": "green",
        "needs extra": "yellow",
        "clash": "yellow",
        "shadowed": "yellow",
        "error": "red",
        "incompatible": "red",
    }
    # the qualified name is DISTRIBUTION:NAME, so it also says where a component comes from
    cells = [
        (
            r["kind"] or "-",
            r["name"] or "-",
            r["qualified_name"] or f"{r['distribution'] or '?'} (plugin {r['plugin']})",
            r["version"] or "?",
            r["status"],
        )
        for r in rows
    ]
    for col in ("kind", "name", "qualified name", "version", "status"):
        # names fold, never truncate (two long distribution names must not end up looking the same);
        # the short columns never wrap
        short = col in ("kind", "version", "status")
        table.add_column(col, overflow="fold", no_wrap=short)
    for c in cells:
        table.add_row(*map(escape, c[:4]), f"[{styles.get(c[4], 'white')}]{c[4]}[/]")
    print_table(table)
    for r in rows:
        if r["error"]:
            what = f"{r['kind']} '{r['name']}'" if r["name"] else f"plugin '{r['plugin']}'"
            console.print(
                f"[{styles.get(r['status'], 'white')}]{escape(what)}:[/] {escape(r['error'])}", highlight=False
            )


@app.command("check-plugins")
@user_errors
def check_plugins(
    names: list[str] | None = typer.Argument(
        None, help="Components to check, plain or DISTRIBUTION:NAME (default: all)."
    ),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        metavar="KEY=VALUE",
        help="Check with this option set, e.g. --set steps=10 (one NAME only; repeatable).",
    ),
    timesteps: int | None = typer.Option(
        None, "--timesteps", min=1, metavar="T", help="T for every check (default 1000; a schedule's num_timesteps)."
    ),
    image_shape: str | None = typer.Option(
        None, "--image-shape", metavar="C,H,W", help="The images denoisers are checked on (default 1,32,32)."
    ),
    schedule: str | None = typer.Option(
        None, "--schedule", metavar="NAME", help="The installed schedule samplers are checked with (default linear)."
    ),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        metavar="CHECK",
        help="Run only this check of one NAME, as the table names it, e.g. --only 'seeds reproduce' (repeatable).",
    ),
    as_json: bool = JsonOption,
    device: str = typer.Option("cpu", "--device", help="Device to run the checks on."),
) -> None:
    """Run the conformance checks on installed schedules, denoisers and samplers; exit 1 if any fails."""
    from ddpmkit.errors import ConfigError
    from ddpmkit.run.config import parse_override
    from ddpmkit.testing import check_component

    targets = _components_named(names or [])
    if (only or set_) and len(targets) > 1 and names and len(names) == 1:
        targets = _the_one_meant(targets, only or [], [item.partition("=")[0].strip() for item in set_ or []])
    if only and len(targets) != 1:
        raise ConfigError("--only needs exactly one component NAME to apply to")
    options: dict = {}
    for item in set_ or []:
        if len(targets) != 1:
            raise ConfigError("--set needs exactly one component NAME to apply to")
        key, value, _ = parse_override(item)
        options[key] = value
    if options and hasattr(targets[0], "kind"):
        from ddpmkit.registry.build import validate_options

        validate_options(targets[0], options)  # a bad option is a user error (exit 2), not a failed check
    shape = _image_shape(image_shape) if image_shape is not None else None
    if schedule is not None:
        from ddpmkit.registry.discovery import find

        find("schedule", schedule)  # an unknown name is one line, before any check
    results = []
    for comp in targets:
        if not as_json:
            console.print(f"checking {comp.label} as {comp.qualified} ...", highlight=False)
        if not hasattr(comp, "kind"):  # an event plugin
            from ddpmkit.testing import check_event_plugin

            results.extend(check_event_plugin(comp.qualified, options or None, only=only))
            continue
        extra: dict = {"device": device}
        own = dict(options)
        if timesteps is not None:
            if comp.kind == "schedule":
                own.setdefault("num_timesteps", timesteps)
            else:
                extra["num_timesteps"] = timesteps
        if shape is not None and comp.kind == "denoiser":
            extra["image_shape"] = shape
        if schedule is not None and comp.kind == "sampler":
            extra["schedule"] = schedule
        results.extend(check_component(comp.kind, comp.qualified, own or None, only=only, **extra))
    if as_json:
        print(json.dumps([x.as_dict() for x in results], indent=2))
    else:
        table = Table(title="conformance")
        for col in ("kind", "name", "check", "result", "detail"):
            table.add_column(col, overflow="fold")
        for x in results:
            table.add_row(
                x.kind,
                x.qualified_name,
                x.check,
                {"pass": "[green]pass[/]", "skip": "[yellow]skip[/]", "FAIL": "[red]FAIL[/]"}[x.verdict],
                escape(x.detail),
            )
        print_table(table)
    failed = [x for x in results if not x.passed]
    if failed:
        if not as_json:
            err_console.print(f"[red]{len(failed)} of {len(results)} checks failed[/]")
        raise typer.Exit(1)


def _image_shape(text: str) -> tuple[int, int, int]:
    from ddpmkit.errors import ConfigError

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--image-shape {text}: expected C,H,W, three positive integers, e.g. 3,32,32")
    return shape  # type: ignore[return-value]


def _the_one_meant(targets: list, only: list[str], keys: list[str]) -> list:
    """Of the components one name means in several kinds (``ddpm``: a sampler and an objective), the one whose checks
    include ``only`` and whose options include ``keys``, when exactly one does; else all of them."""
    from ddpmkit.errors import ConfigError
    from ddpmkit.registry.discovery import load
    from ddpmkit.testing import KITS

    def fits(comp) -> bool:
        if not hasattr(comp, "kind"):
            return False
        try:
            KITS[comp.kind].select(only)
        except ConfigError:
            return False
        fields = getattr(load(comp).Options, "model_fields", {})
        return all(key.split(".")[0] in fields for key in keys)

    fitting = [c for c in targets if fits(c)]
    return fitting if len(fitting) == 1 else targets


def _components_named(names: list[str]) -> list:
    """The installed components ``names`` mean (each plain name in every kind that has it); when empty, all
    of them but those that need an optional extra that is not installed (said in one line each)."""
    from ddpmkit.errors import MissingExtra, PluginError
    from ddpmkit.kinds import KINDS
    from ddpmkit.registry.discovery import find, find_plugin, load, registry

    reg = registry()
    if not names:
        found = []
        for comp in (c for c in reg.components if c.plugin.status == "ok"):
            try:
                load(comp)
            except PluginError as exc:
                if isinstance(exc.__cause__, MissingExtra):
                    err_console.print(f"skipping {comp.qualified}: {escape(str(exc.__cause__))}", highlight=False)
                    continue
            found.append(comp)
        return found
    found = []
    for name in names:
        kinds = [k for k in KINDS if reg.named(k, name.rpartition(":")[2])]
        if kinds:
            found.extend(find(kind, name) for kind in kinds)
            continue
        try:  # an event plugin (checked by driving its hooks), named by its entry point
            found.append(find_plugin(name))
        except PluginError:
            raise PluginError(
                f"no installed component or event plugin named {name}; see ddpmkit list-plugins"
            ) from None
    return found


@app.command()
@user_errors
def describe(
    name: str = typer.Argument(..., help="A component or event plugin, plain or DISTRIBUTION:NAME, e.g. unet."),
    kind: str | None = typer.Option(
        None, "--kind", help="schedule, denoiser, sampler or events (when a name is used by several kinds)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Show a component's (or an event plugin's) options: types, defaults and descriptions."""
    from ddpmkit.errors import PluginError
    from ddpmkit.kinds import EVENTS, KINDS
    from ddpmkit.registry.discovery import event_plugins, find, find_plugin, load, registry
    from ddpmkit.run.data import DATASETS

    reg = registry()
    if kind and kind not in (*KINDS, EVENTS, "dataset"):
        raise PluginError(f"--kind must be one of {', '.join((*KINDS, EVENTS, 'dataset'))}")
    short = name.rpartition(":")[2]
    kinds = [k for k in KINDS if reg.named(k, short)]
    if any(p.name == short for p, _ in event_plugins(reg)) or any(
        p.name == short and p.options_model for p in reg.plugins
    ):
        kinds.append(EVENTS)
    if name in DATASETS:
        kinds.append("dataset")
    if kind:
        kinds = [kind]
    if not kinds:
        raise PluginError(
            f"nothing installed is named '{name}'; components: {', '.join(sorted({c.name for c in reg.components}))}; "
            f"event plugins: {', '.join(sorted(p.name for p, _ in event_plugins(reg))) or 'none'}; "
            f"datasets: {', '.join(DATASETS)}"
        )
    if len(kinds) > 1:
        raise PluginError(f"'{name}' names a {' and a '.join(kinds)}; choose one with --kind")
    if kinds[0] == "dataset":
        if name not in DATASETS:
            raise PluginError(f"no dataset is named '{name}'; datasets: {', '.join(DATASETS)}")
        _describe_dataset(name, as_json)
        return
    if kinds[0] == EVENTS:
        plugin = find_plugin(name)
        model, title = (
            plugin.options_model,
            f"event plugin [bold]{plugin.name}[/] ({plugin.distribution} {plugin.version})",
        )
        title += escape(f", configured by [plugins.{plugin.name}]")
    else:
        comp = find(kinds[0], name)
        cls = load(comp)
        model, title = cls.Options, f"{escape(comp.label)} as {comp.qualified}"
        if comp.kind == "denoiser":  # what [conditioning] kind it can be trained on (plugin API 3)
            takes = sorted(getattr(cls, "conditions", frozenset()))
            title += f"; conditions: {', '.join(takes) if takes else 'none (unconditional only)'}"
    schema = model.model_json_schema() if model is not None else {"properties": {}}
    if as_json:
        print(json.dumps(schema, indent=2))
        return
    console.print(title, highlight=False)
    if not schema.get("properties"):
        console.print("no options")
        return
    _options_table(schema)


def _describe_dataset(name: str, as_json: bool) -> None:
    """``[data] dataset = NAME``: what it reads and the [data] keys that apply to it."""
    from ddpmkit.extras import install_hint, is_missing
    from ddpmkit.run.config import DataSection
    from ddpmkit.run.data import DATASETS

    info = DATASETS[name]
    schema = DataSection.model_json_schema()
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k in ("dataset", *info.options)}
    if as_json:
        print(json.dumps(schema, indent=2))
        return
    title = f'dataset [bold]{name}[/] ([data] dataset = "{name}"): {escape(info.summary)}'
    if info.extra and is_missing(info.extra):
        title += f"\n[yellow]needs an extra that is not installed:[/] {install_hint(info.extra)}"
    console.print(title, highlight=False)
    _options_table(schema)


def _options_table(schema: dict) -> None:
    from ddpmkit.run.reference import schema_type

    table = Table()
    for col in ("option", "type", "default", "description"):
        table.add_column(col)
    for key, prop in schema.get("properties", {}).items():
        table.add_row(
            key,
            escape(schema_type(prop)),
            escape(json.dumps(prop.get("default"))),
            escape(prop.get("description", "")),
        )
    console.print(table)  # prose descriptions: wrapped at the width
