"""Errors a user can cause: the CLI prints them as one line and exits with code 2.

Also the warning category ddpmkit uses for things a user should see but that do not stop a run, and
:func:`attempt`, for a report (a benchmark, a speed-mode trial) that goes on without what failed unexpectedly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "EXIT_INTERRUPTED",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataNotFound",
    "DdpmkitError",
    "DdpmkitWarning",
    "HookFailed",
    "MissingExtra",
    "MissingLabels",
    "PluginCodeError",
    "PluginError",
    "TrainingDiverged",
]

#: Set to 1 (or pass ``--debug``) to see the full traceback behind a one-line plugin error.
DEBUG_ENV = "DDPMKIT_DEBUG"


class DdpmkitError(Exception):
    """Base of every error caused by user input (config, paths, data, checkpoints, plugin names)."""


class ConfigError(DdpmkitError):
    """A config file or override that cannot be read or does not validate."""


class PluginError(DdpmkitError):
    """An unknown, ambiguous or broken plugin component was asked for."""


class PluginCodeError(PluginError):
    """A plugin's own code raised (or returned something unusable) while ddpmkit used it.

    The message names the component, its plugin and distribution; ``__cause__`` is the original
    exception, shown with ``--debug`` or ``DDPMKIT_DEBUG=1``.
    """


class MissingExtra(PluginError):
    """A component needs an optional extra of ddpmkit (``pip install 'ddpmkit[NAME]'``) that is not installed."""


class HookFailed(PluginError):
    """An event hook raised; training stops after a checkpoint and the run ends with this message."""


class DataError(DdpmkitError):
    """A dataset that cannot be found, downloaded or read."""


class DataNotFound(DataError):
    """A downloadable dataset that is not on disk (and was not to be downloaded, or could not be)."""


class MissingLabels(DataError):
    """Class labels were needed (a conditional run, eval's own-data classifier) and the dataset has none."""


class CheckpointError(DdpmkitError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible with the config."""


class TrainingDiverged(DdpmkitError):
    """The loss became NaN or infinite (usually too large a learning rate)."""


class DdpmkitWarning(UserWarning):
    """Something a user should know (a shadowed plugin name, a deprecated key); the CLI prints one line."""


def debug_enabled() -> bool:
    """Whether full tracebacks were asked for (``DDPMKIT_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


#: The exit code of a run or a sampling stopped by Ctrl-C or SIGTERM (128 + SIGINT), after saving what was done.
EXIT_INTERRUPTED = 130


_T = TypeVar("_T")


def attempt(fn: Callable[[], _T]) -> tuple[_T | None, str | None]:
    """``(fn(), None)``, or ``(None, the error in one line)`` where ``fn`` raised something unexpected (a broken
    toolchain or driver under torch.compile, say), for a report that goes on without it; ddpmkit's own errors (a
    user's mistake) and KeyboardInterrupt still propagate."""
    try:
        return fn(), None
    except DdpmkitError:
        raise
    except Exception as exc:
        return None, first_line(exc)


def first_line(exc: BaseException, limit: int | None = 200, *, more: str = "") -> str:
    """``TypeName: the first line of its message``, at most ``limit`` characters, ``more`` added where the message
    had more lines: an exception named in one line (a report that goes on without what failed, a plugin's error)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    text += more if len(lines) > 1 else ""
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
