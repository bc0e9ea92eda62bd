"""Progress bars for the library's progress callbacks (rich)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def sampling_progress(console: Console, total: int, description: str = "sampling") -> Iterator[Callable[[int], None]]:
    """A bar over image-steps; yields ``advance(n)``."""
    progress = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("image-steps"),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


@contextmanager
def training_progress(console: Console, total: int, completed: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A bar over training steps with the epoch, the smoothed loss and images/s; yields ``show(metrics)``."""
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[ips]:.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task("train", total=total, completed=completed, epoch=1, loss=float("nan"), ips=0.0)
    smoothed: dict[str, float | None] = {"loss": None}

    def show(m: dict[str, Any]) -> None:
        prev = smoothed["loss"]
        smoothed["loss"] = m["loss"] if prev is None else 0.98 * prev + 0.02 * m["loss"]
        if "planned_steps" in m:  # a time budget re-planned the run from the loop's own speed
            progress.update(task, total=m["planned_steps"])
        progress.update(task, completed=m["step"], epoch=m["epoch"] + 1, loss=smoothed["loss"], ips=m["images_per_s"])

    with progress:
        yield show
