"""Process lifetimes: a launched process that stops when the process that launched it dies, SIGTERM that
unwinds like Ctrl-C, and a launcher that passes SIGTERM on to what it launched."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


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
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises Terminated (in the main thread, where SIGTERM still has its default action)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def sigterm_forwarded(child: subprocess.Popen) -> Iterator[None]:
    """Within: SIGTERM is passed on to ``child``, which stops in its own way, and waited for (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
