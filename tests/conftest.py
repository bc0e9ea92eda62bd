from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Where the real MNIST IDX files are (no network in CI): $DDPMKIT_TEST_MNIST_ROOT or ../shared/data."""
    root = Path(os.environ.get("DDPMKIT_TEST_MNIST_ROOT", REPO.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST IDX files not found under {root}/MNIST/raw")
    return root


@pytest.fixture
def fresh_plugin_registry(monkeypatch):
    """Third-party plugins allowed, and the registry rediscovered before and after the test."""
    from ddpmkit import plugins

    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()
