"""Turning an exception from a plugin's code into one line that names the component and its plugin."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ddpmkit.errors import DdpmkitError, PluginCodeError, first_line

if TYPE_CHECKING:
    from ddpmkit.registry.discovery import Component


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, with a hint when the message had more lines."""
    return first_line(exc, limit=None, more=" (…; --debug shows all)")


@contextmanager
def blame(component: Component, action: str) -> Iterator[None]:
    """Re-raise any exception from the block as a one-line error naming ``component``.

    A ddpmkit error the plugin raised on purpose (say, a ConfigError for an image size it cannot
    handle) keeps its type and message, prefixed with the component. Anything else becomes a
    :class:`PluginCodeError`; the original stays as ``__cause__`` for ``--debug``.
    """
    try:
        yield
    except PluginCodeError:
        raise
    except DdpmkitError as exc:
        message = str(exc)
        if component.label in message:
            raise
        try:
            wrapped = type(exc)(f"{component.label}: {message}")
        except Exception:  # a plugin's own error class with another constructor
            wrapped = PluginCodeError(f"{component.label}: {message}")
        raise wrapped from exc
    except Exception as exc:
        raise PluginCodeError(f"{component.label} failed {action}: {one_line(exc)}") from exc
