"""The Typer application, its consoles, the options several commands share (each declared once here), and
the rule that a user's mistake is one line on stderr with exit code 2."""

from __future__ import annotations

import functools
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import typer
from rich.console import Console
from rich.markup import escape

from ddpmkit.errors import DEBUG_ENV, EXIT_INTERRUPTED, DdpmkitError, DdpmkitWarning, debug_enabled
from ddpmkit.runtime.processes import sigterm_interrupts
from ddpmkit.version import __version__

if TYPE_CHECKING:
    from rich.table import Table

app = typer.Typer(
    name="ddpmkit",
    help="Train and sample Denoising Diffusion Probabilistic Models from one TOML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Stdout:
    """sys.stdout that, once it cannot be written (a full disk, /dev/full, a closed pipe), says so once on
    stderr and writes there instead: a failing log must not stop a training run."""

    def __init__(self) -> None:
        self.failed = False

    @property
    def _target(self) -> TextIO:
        return sys.stderr if self.failed else sys.stdout

    def write(self, text: str) -> int:
        try:
            return self._target.write(text)
        except OSError as exc:
            if self.failed:
                raise
            self.failed = True
            sys.stderr.write(
                f"warning: cannot write to standard output ({exc.strerror or exc}); "
                "writing to standard error from now on\n"
            )
            return sys.stderr.write(text)

    def flush(self) -> None:
        try:
            self._target.flush()
        except OSError:
            if not self.failed:
                self.failed = True
                sys.stderr.write("warning: cannot write to standard output; writing to standard error from now on\n")

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._target, "encoding", "utf-8")


# emoji=False: ":100:" in "ddim:100:" is a step count. soft_wrap: a message that names a path or a figure
# is never broken mid-phrase at the terminal's width (tables still fit it).
console = Console(file=_Stdout(), emoji=False, soft_wrap=True)  # type: ignore[arg-type]
err_console = Console(stderr=True, emoji=False, soft_wrap=True)


def print_table(table: Table) -> None:
    """Print ``table`` whole: in a terminal rich fits it to the width; into a file or a pipe, which have none, at
    its natural width, so that no cell (a speed mode's name, a plugin's error) is cut to an ellipsis at 80 columns.
    (For tables of prose, where wrapping at 80 reads better, print them as they are.)"""
    if console.is_terminal:
        console.print(table)
        return
    fitted = console.width
    console.width = max(fitted, console.measure(table, options=console.options.update_width(10_000)).maximum)
    try:
        console.print(table)
    finally:
        console.width = fitted


SetOption = typer.Option(
    None,
    "--set",
    metavar="KEY.PATH=VALUE",
    help="Override a config value, e.g. --set train.batch_size=128 (repeatable).",
)
SamplingSetOption = typer.Option(
    None,
    "--set",
    metavar="KEY.PATH=VALUE",
    help=(
        "A sampling override: sampler.*, sample.*, guidance.* or the speed modes train.precision, "
        "train.channels_last and train.compile, e.g. --set sampler.options.eta=0.5 (repeatable)."
    ),
)
DataRootOption = typer.Option(
    None,
    "--data-root",
    help="The folder holding the dataset, e.g. MNIST/raw (overrides data.root and DDPMKIT_DATA_ROOT).",
)
DeviceOption = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (overrides run.device).")
JsonOption = typer.Option(False, "--json", help="Print only JSON on stdout.")
SeedOption = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the sampling.")
SamplerOption = typer.Option(None, "--sampler", help="Another installed sampler than the run's, e.g. ddim.")
StepsOption = typer.Option(
    None, "--steps", min=1, help="The sampler's number of steps (its steps option), e.g. --sampler ddim --steps 20."
)
GuidanceOption = typer.Option(
    None,
    "--guidance",
    metavar="W",
    help="Guidance weight w (1 = none): classifier-free for a conditional run, else autoguidance (the run's guide).",
)
NrowOption = typer.Option(None, "--nrow", min=1, help="Images per row of the grid PNG (default: a square grid).")

_flags = {"debug": False}


def warn(text: str, *, out: Console | None = None) -> None:
    """A warning line, on stdout with the run's other output unless ``out`` is another console (stderr)."""
    (out or console).print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


def warner(out: Console) -> Callable[[str], None]:
    """:func:`warn` onto ``out``, as a callback (``load_run``'s ``warn``)."""
    return functools.partial(warn, out=out)


def say(text: str) -> None:
    """A plain line on stdout (no markup is read from ``text``)."""
    console.print(escape(text), highlight=False)


def debug() -> bool:
    return _flags["debug"] or debug_enabled()


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """ddpmkit's warnings are one line on stderr; others keep Python's format."""
    if issubclass(category, DdpmkitWarning):
        warn(str(message), out=err_console)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def user_errors(func: Callable) -> Callable:
    """Turn a DdpmkitError into one line on stderr and exit code 2, and an interrupt the command did not handle
    itself (Ctrl-C, SIGTERM) into one line and exit code 130; bugs keep their traceback.

    With ``--debug`` (or DDPMKIT_DEBUG=1) the traceback behind a one-line plugin error is shown too.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", DdpmkitWarning)
        try:
            with sigterm_interrupts():
                return func(*args, **kwargs)
        except DdpmkitError as exc:
            if debug():
                traceback.print_exception(exc, file=sys.stderr)
            # escape: a message may quote user text such as "[/x]" that rich would read as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            if debug():
                traceback.print_exception(exc, file=sys.stderr)
            err_console.print(escape(str(exc)) or "interrupted", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"ddpmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help=f"Show the full traceback behind an error (or set {DEBUG_ENV}=1)."
    ),
) -> None:
    _flags["debug"] = debug


def sampling_overrides(
    overrides: list[str] | None, *, guidance: float | None = None, steps: int | None = None
) -> list[Any]:
    """The ``--set`` items, plus ``guidance.weight`` from ``--guidance`` and ``sampler.options.steps`` from ``--steps``
    (errors name them as the user gave them)."""
    given = list(overrides or [])
    if guidance is not None:
        given.append((f"guidance.weight={guidance!r}", f"--guidance {guidance:g}"))
    if steps is not None:
        given.append((f"sampler.options.steps={steps}", f"--steps {steps}"))
    return given


def with_device(overrides: list[str] | None, device: str | None) -> list[Any]:
    """The ``--set`` items, plus ``run.device`` from ``--device`` (errors name it as ``--device D``)."""
    return list(overrides or []) + ([(f"run.device={device}", f"--device {device}")] if device else [])


def with_data_root(overrides: list[Any], data_root: Path | None) -> list[Any]:
    """The overrides, plus ``data.root`` from ``--data-root`` (errors name it as ``--data-root PATH``): folded into the
    config once, like ``--device``; it is not part of the run's identity, so a run resumes from another folder."""
    from ddpmkit.run.config import data_root_override

    return list(overrides) + ([data_root_override(data_root, f"--data-root {data_root}")] if data_root else [])


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written (a folder, a read-only place): a command that
    measures for minutes must not lose its figures at the end."""
    from ddpmkit.errors import DdpmkitError

    if path.is_dir():
        raise DdpmkitError(f"{option} {path}: is a folder; name a file")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise DdpmkitError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None
    if not existed:
        path.unlink(missing_ok=True)


def mnist_root(data_root: Path | None) -> Path:
    """Where eval and sweep read MNIST: --data-root, else $DDPMKIT_DATA_ROOT, else ./data (as a run config's
    default)."""
    from ddpmkit.run.data import default_root

    return Path(data_root) if data_root is not None else default_root()
