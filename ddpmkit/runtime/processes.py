"""Process lifetimes: a launched process that stops when the process that launched it dies."""

from __future__ import annotations

import sys


def signal_on_parent_death(signum: int) -> None:
    """Ask Linux to send this process ``signum`` when its parent dies, even by SIGKILL (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
