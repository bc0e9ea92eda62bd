"""Refusing up front what would exhaust the machine: sizes are checked against the memory available
before anything is allocated, so a mistake is one line with the estimate, not the kernel's OOM killer."""

from __future__ import annotations

import os

from ddpmkit.errors import ConfigError
from ddpmkit.runtime.units import format_bytes

__all__ = [
    "available_memory",
    "check_fits",
]


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux: MemAvailable; elsewhere: physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


def check_fits(needed: float, what: str, hint: str) -> None:
    """ConfigError naming ``what``, the estimate and ``hint`` when ``needed`` bytes exceed the memory available."""
    available = available_memory()
    if needed > available:
        raise ConfigError(
            f"{what} needs about {format_bytes(needed)} of memory and {format_bytes(available)} is available; {hint}"
        )
