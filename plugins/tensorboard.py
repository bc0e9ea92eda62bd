"""Writes loss, learning rate and throughput to ``<run>/tensorboard`` when ``log.tensorboard = true``.

Needs the ``tensorboard`` package; this module imports nothing heavy until a run asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpmkit import ConfigError, hookimpl

_writers: dict[Path, Any] = {}


@hookimpl
def train_start(run: Any) -> None:
    if not run.config.log.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    _writers[Path(run.run_dir)] = SummaryWriter(log_dir=str(Path(run.run_dir) / "tensorboard"), purge_step=run.start_step + 1)


@hookimpl
def step_end(run: Any, step: int, metrics: dict[str, Any]) -> None:
    writer = _writers.get(Path(run.run_dir))
    if writer is None:
        return
    writer.add_scalar("train/loss", metrics["loss"], step)
    writer.add_scalar("train/lr", metrics["lr"], step)
    writer.add_scalar("train/images_per_s", metrics["images_per_s"], step)


@hookimpl
def checkpoint_written(run: Any) -> None:
    writer = _writers.get(Path(run.run_dir))
    if writer is not None:
        writer.flush()


@hookimpl
def train_end(run: Any) -> None:
    writer = _writers.pop(Path(run.run_dir), None)
    if writer is not None:
        writer.close()
