"""Writes loss, learning rate and throughput to ``<run>/tensorboard`` when ``[plugins.tensorboard] enabled = true``.

Needs the ``tensorboard`` package; this module imports nothing heavy until a run asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ddpmkit import hookimpl
from ddpmkit.errors import MissingExtra

DDPMKIT_PLUGIN_API = [2]


class Options(BaseModel):
    """The ``[plugins.tensorboard]`` table."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="write TensorBoard event files to <run>/tensorboard (needs tensorboard)")
    flush_every: int = Field(0, ge=0, description="also flush every N steps (0: only at checkpoints)")


_writers: dict[Path, Any] = {}


@hookimpl
def train_start(run: Any, options: Options) -> None:
    if not options.enabled:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtra(
            "[plugins.tensorboard] enabled = true needs the tensorboard package: pip install 'ddpmkit[tensorboard]'"
        ) from None
    _writers[Path(run.run_dir)] = SummaryWriter(
        log_dir=str(Path(run.run_dir) / "tensorboard"), purge_step=run.start_step + 1
    )


@hookimpl
def step_end(run: Any, step: int, metrics: dict[str, Any], options: Options) -> None:
    writer = _writers.get(Path(run.run_dir))
    if writer is None:
        return
    writer.add_scalar("train/loss", metrics["loss"], step)
    writer.add_scalar("train/lr", metrics["lr"], step)
    writer.add_scalar("train/images_per_s", metrics["images_per_s"], step)
    if options.flush_every and step % options.flush_every == 0:
        writer.flush()


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
