"""Process lifetimes: a launched process that stops when the process that launched it dies, SIGTERM that
unwinds like Ctrl-C, and a launcher that passes SIGTERM on to what it launched."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def signal_on_parent_death(signum: int) -> None:
    """Ask Linux to send this process ``signum`` when its parent dies, even by SIGKILL (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where it lands like Ctrl-C's KeyboardInterrupt, so that ``finally`` blocks run (a run's
    lock is released) instead of the process vanishing mid-way. Training loops catch the signal themselves
    and stop at the end of a step."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("stopped by SIGTERM")


@contextmanager
def signals_handled(
    handler: Callable[[int, Any], None], signums: tuple[int, ...] = (signal.SIGTERM,)
) -> Iterator[dict[int, Any] | None]:
    """Within: ``handler`` for each of ``signums``; the previous handlers are restored after, and yielded (None off
    the main thread, where Python cannot set handlers and nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, handler)
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises Terminated (in the main thread, where SIGTERM still has its default action)."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    with signals_handled(_raise_terminated):
        yield


@contextmanager
def sigterm_forwarded(child: subprocess.Popen) -> Iterator[None]:
    """Within: SIGTERM is passed on to ``child``, which stops in its own way, and waited for (main thread only)."""
    with signals_handled(lambda signum, frame: child.send_signal(signum)):
        yield
