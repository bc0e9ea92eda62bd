"""Writes every step's metrics to ``<run>/metrics.jsonl``, one JSON object a line (``[plugins.metrics] enabled``).

On resume, lines past the checkpoint being resumed from are dropped first: they will be written again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from ddpmkit import METRICS_FILE, hookimpl

DDPMKIT_PLUGIN_API = [2]


class Options(BaseModel):
    """The ``[plugins.metrics]`` table."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="write every step's metrics to metrics.jsonl in the run directory")


FILE_NAME = METRICS_FILE
_open: dict[Path, IO[str]] = {}


def _trim(path: Path, up_to_step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= up_to_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


@hookimpl
def train_start(run: Any, options: Options) -> None:
    if not options.enabled:
        return
    path = Path(run.run_dir) / FILE_NAME
    if run.start_step == 0:
        path.unlink(missing_ok=True)
    else:
        _trim(path, run.start_step)
    # line-buffered: a kill between writing a checkpoint and the next flush must not lose the lines up to it
    _open[Path(run.run_dir)] = open(path, "a", encoding="utf-8", buffering=1)


@hookimpl
def step_end(run: Any, metrics: dict[str, Any]) -> None:
    f = _open.get(Path(run.run_dir))
    if f is not None:
        f.write(json.dumps(metrics) + "\n")


@hookimpl
def checkpoint_written(run: Any) -> None:
    f = _open.get(Path(run.run_dir))
    if f is not None:
        f.flush()


@hookimpl
def train_end(run: Any) -> None:
    f = _open.pop(Path(run.run_dir), None)
    if f is not None:
        f.close()
