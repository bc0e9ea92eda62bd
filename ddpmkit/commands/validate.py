"""``ddpmkit validate``: check a config, build what it names, and report on the run before it starts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ddpmkit.commands.app import DataRootOption, SetOption, app, console, user_errors, warn, with_data_root


@app.command()
@user_errors
def validate(
    config: Path = typer.Argument(..., help="The run's TOML config."),
    set_: list[str] | None = SetOption,
    data_root: Path | None = DataRootOption,
    timing: bool = typer.Option(
        True, "--timing/--no-timing", help="Time a few training steps to estimate the run's length."
    ),
) -> None:
    """Check a config, build what it names, and report on the run before it starts (no training)."""
    from ddpmkit.run.components import build_checked
    from ddpmkit.run.config import load_config
    from ddpmkit.run.data import settle
    from ddpmkit.training.preflight import describe_config, preflight

    cfg = load_config(config, with_data_root(list(set_ or []), data_root))
    cfg.check_extras()
    cfg = settle(cfg)  # a missing or empty folder is one line here
    built = build_checked(cfg)
    console.print(describe_config(cfg, built))
    from ddpmkit.training.autotune import announced

    with announced(lambda line: console.print(escape(line.strip()), highlight=False)):
        findings = preflight(cfg, built, timing=timing)
    for f in findings:
        console.print(f"{f.label:<10} {escape(f.text)}", highlight=False)
    for f in findings:
        if f.warning:
            warn(f.warning)
    console.print(f"[green]ok:[/] {config} is valid")
