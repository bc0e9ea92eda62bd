"""One writer per run directory: a lock file holding the writer's pid and host.

Two ``ddpmkit run`` processes on one run would interleave checkpoints and metrics (or one would
silently replace the other's); the second refuses instead, naming the first. A lock left by a
process that no longer exists on this host (killed, crashed) is stale and taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddpmkit.errors import DdpmkitError

LOCK_FILE = "run.lock"


class RunLocked(DdpmkitError):
    """Another live process is writing this run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # on Linux, a killed process its parent has not yet reaped (a zombie) writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def acquire(run_dir: Path) -> Path:
    """Create ``run_dir/run.lock`` for this process; RunLocked if a live process holds it."""
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:  # half-written by a process killed between open and write, or damaged
                if time.time() - _mtime(path) < 5:
                    time.sleep(0.2)
                    continue
            elif holder.get("host") != me["host"] or _alive(holder["pid"]):
                if holder["pid"] == me["pid"] and holder.get("host") == me["host"]:
                    return path  # this process already holds it
                raise _refusal(run_dir, path, holder) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunLocked(f"{run_dir}: could not take {path}; another process keeps creating it")


def _refusal(run_dir: Path, path: Path, holder: dict) -> RunLocked:
    return RunLocked(
        f"{run_dir} is being written by ddpmkit process {holder['pid']} on {holder.get('host')} "
        f"(since {holder.get('since')}); wait for it to finish or stop it "
        f"(if no ddpmkit process runs there any more, delete {path})"
    )


def check_free(run_dir: Path) -> None:
    """RunLocked if a live process holds ``run_dir``'s lock (nothing is taken): a launcher's early refusal,
    before it starts processes that would each meet the lock."""
    path = run_dir / LOCK_FILE
    holder = _holder(path)
    if holder is not None and (holder.get("host") != socket.gethostname() or _alive(holder["pid"])):
        raise _refusal(run_dir, path, holder)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _holder(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def locked(run_dir: Path) -> Iterator[Path]:
    """Hold the run's lock for the duration of the block."""
    path = acquire(run_dir)
    try:
        yield path
    finally:
        release(path)
