"""The ``ddpmkit`` command line (Typer + rich).

torch and the plugins' heavy code are imported inside the commands that need them, so that
``ddpmkit --help`` and ``ddpmkit list-plugins`` answer fast.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import DdpmkitError

app = typer.Typer(
    name="ddpmkit",
    help="Train and sample Denoising Diffusion Probabilistic Models from one TOML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option(
    None, "--set", metavar="KEY.PATH=VALUE", help="Override a config value, e.g. --set train.batch_size=128 (repeatable)."
)


def user_errors(func: Callable) -> Callable:
    """Turn a DdpmkitError into one line on stderr and exit code 2; bugs keep their traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DdpmkitError as exc:
            # escape: a message may quote user text such as "[/x]" that rich would read as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"ddpmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


@app.command("list-plugins")
@user_errors
def list_plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table.")) -> None:
    """Show the installed noise schedules, denoisers and samplers, and plugins that failed to load."""
    from .plugins import list_plugins

    rows = list_plugins()
    if as_json:
        keys = ("kind", "name", "plugin", "distribution", "version", "status", "error")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        return
    table = Table(title="ddpmkit plugins")
    for col in ("kind", "name", "plugin", "distribution", "version", "status"):
        table.add_column(col)
    styles = {"ok": "green", "clash": "yellow", "error": "red"}
    for r in rows:
        status = f"[{styles.get(r['status'], 'white')}]{r['status']}[/]"
        table.add_row(r["kind"] or "-", r["name"] or "-", r["plugin"], r["distribution"] or "?", r["version"] or "?", status)
    console.print(table)
    for r in rows:
        if r["error"]:
            what = f"{r['kind']} '{r['name']}'" if r["name"] else f"plugin '{r['plugin']}'"
            console.print(f"[{styles.get(r['status'], 'white')}]{escape(what)}:[/] {escape(r['error'])}", highlight=False)


@app.command()
@user_errors
def validate(
    config: Path = typer.Argument(..., help="The run's TOML config."),
    set_: Optional[List[str]] = SetOption,
) -> None:
    """Check a config and show what it builds (no training)."""
    from .config import load_config
    from .summary import describe_config

    cfg = load_config(config, set_)
    console.print(describe_config(cfg))
    console.print(f"[green]ok:[/] {config} is valid")


@app.command()
@user_errors
def run(
    config: Path = typer.Argument(..., help="The run's TOML config."),
    set_: Optional[List[str]] = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run's checkpoints and start over."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Where the dataset lives (overrides data.root and DDPMKIT_DATA_ROOT)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (overrides run.device)."),
) -> None:
    """Train (or resume) the run a config describes, then sample from it."""
    from .config import load_config
    from .runner import run_config

    overrides = list(set_ or [])
    if device:
        overrides.append(f"run.device={device}")
    cfg = load_config(config, overrides)
    code = run_config(cfg, console=console, fresh=fresh, data_root=data_root)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def sample(
    source: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    num: int = typer.Option(16, "--num", min=1, help="Number of images."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    out: Path = typer.Option(Path("samples.png"), "--out", help="FILE.png (a grid) or FILE.npz (uint8 NHWC 'images')."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw weights instead of the EMA weights."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Another installed sampler than the config's."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", metavar="KEY.PATH=VALUE", help="Override a config value, e.g. --set sampler.options.variance=posterior."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Draw images from a trained run's checkpoint."""
    from .sampling import sample_command

    sample_command(
        source,
        num=num,
        batch_size=batch_size,
        seed=seed,
        out=out,
        use_ema=not raw,
        sampler=sampler,
        overrides=list(set_ or []),
        device=device,
        console=console,
    )


@app.command("check-plugins")
@user_errors
def check_plugins(
    names: Optional[List[str]] = typer.Argument(None, help="Component names to check (default: every installed one)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of results instead of a table."),
    device: str = typer.Option("cpu", "--device", help="Device to run the checks on."),
) -> None:
    """Run the conformance checks on installed schedules, denoisers and samplers; exit 1 if any fails."""
    from .errors import PluginError
    from .plugins import list_plugins
    from .testing import check_component

    rows = [r for r in list_plugins() if r["kind"] in ("schedule", "denoiser", "sampler")]
    if names:
        unknown = sorted(set(names) - {r["name"] for r in rows})
        if unknown:
            raise PluginError(f"no installed component named {', '.join(unknown)}; see ddpmkit list-plugins")
        rows = [r for r in rows if r["name"] in names]
    results = []
    for r in rows:
        if not as_json:
            console.print(f"checking {r['kind']} '{r['name']}' ({r['distribution']} {r['version']}) ...", highlight=False)
        results.extend(check_component(r["kind"], r["name"], device=device))
    if as_json:
        print(json.dumps([x.as_dict() for x in results], indent=2))
    else:
        table = Table(title="conformance")
        for col in ("kind", "name", "check", "result", "detail"):
            table.add_column(col)
        for x in results:
            table.add_row(x.kind, x.name, x.check, "[green]pass[/]" if x.passed else "[red]FAIL[/]", escape(x.detail))
        console.print(table)
    failed = [x for x in results if not x.passed]
    if failed:
        if not as_json:
            err_console.print(f"[red]{len(failed)} of {len(results)} checks failed[/]")
        raise typer.Exit(1)


@app.command()
@user_errors
def describe(
    name: str = typer.Argument(..., help="A component name, e.g. unet."),
    kind: Optional[str] = typer.Option(None, "--kind", help="schedule, denoiser or sampler (when a name is used by several kinds)."),
    as_json: bool = typer.Option(False, "--json", help="Print the options' JSON schema."),
) -> None:
    """Show a component's options: types, defaults and descriptions (from its Options model)."""
    from .errors import PluginError
    from .plugins import KIND_HOOKS, find, options_model, registry

    kinds = [kind] if kind else [k for k in KIND_HOOKS if registry().named(k, name)]
    if kind and kind not in KIND_HOOKS:
        raise PluginError(f"--kind must be one of {', '.join(KIND_HOOKS)}")
    if not kinds:
        find("denoiser" if kind is None else kind, name)  # raises the "unknown ..., installed: ..." error
        kinds = ["denoiser"]
    if len(kinds) > 1:
        raise PluginError(f"'{name}' names a {' and a '.join(kinds)}; choose one with --kind")
    comp = find(kinds[0], name)
    schema = options_model(kinds[0], name).model_json_schema()
    if as_json:
        print(json.dumps(schema, indent=2))
        return
    console.print(
        f"{kinds[0]} [bold]{name}[/] from plugin '{comp.plugin.name}' ({comp.plugin.distribution} {comp.plugin.version})",
        highlight=False,
    )
    table = Table()
    for col in ("option", "type", "default", "description"):
        table.add_column(col)
    for key, prop in schema.get("properties", {}).items():
        table.add_row(key, escape(_schema_type(prop)), escape(json.dumps(prop.get("default"))), escape(prop.get("description", "")))
    console.print(table)


def _schema_type(prop: dict) -> str:
    """A short type name for one property of a JSON schema."""
    if "enum" in prop:
        return "one of " + ", ".join(map(str, prop["enum"]))
    if "type" in prop:
        return str(prop["type"])
    return " | ".join(str(a.get("type", "?")) for a in prop.get("anyOf", [])) or "?"


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ddpmkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
