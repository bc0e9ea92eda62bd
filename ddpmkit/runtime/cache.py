"""Where ddpmkit keeps what it measured or trained for later runs (speed figures, evaluation classifiers)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DDPMKIT_CACHE_DIR"


def cache_dir() -> Path:
    """``$DDPMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpmkit``, else ``~/.cache/ddpmkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpmkit"
