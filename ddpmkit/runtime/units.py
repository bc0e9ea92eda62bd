"""Sizes and durations as people read them."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            return f"{n:,.1f} {unit}"
    return f"{n / 1024:,.1f} PiB"


def format_duration(seconds: float) -> str:
    """``"1h 05m"`` or ``"4m 07s"``; ``"?"`` for an unknown (infinite) duration."""
    if seconds == float("inf"):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"
