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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ddpmkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
