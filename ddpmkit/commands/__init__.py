"""The ``ddpmkit`` command line (Typer + rich): one module per command or family of commands, and the
only part of ddpmkit that prints.

torch and the plugins' heavy code are imported inside the commands that need them, so that
``ddpmkit --help`` and ``ddpmkit list-plugins`` answer fast.
"""

from __future__ import annotations

# each module registers its commands, in the order `ddpmkit --help` lists them
from ddpmkit.commands import bench, edit, ema, evaluate, export, plugins, run, sample, serve, validate  # noqa: E402, F401, I001
from ddpmkit.commands.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ddpmkit")
