"""Multi-process training on PyTorch's own engine: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, ddpmkit
joins the process group (gloo on CPU, NCCL on CUDA) and trains with DistributedDataParallel.

Decisions: ``train.batch_size`` is the global batch, split evenly across ranks, and each rank takes
its slice of the very batch, timesteps and noise a single process would draw at that step — so a
2-process run follows a 1-process run up to the order of float sums (dropout masks aside). DDP
averages the gradients, so every rank applies the same update and keeps an identical EMA. Only rank
0 writes (checkpoints, metrics, event plugins, samples); every step ends with one small all-reduce
of the ranks' stop flags (a signal, a failing hook, an I/O error on rank 0), so an error anywhere
stops every rank at the same step instead of leaving the others waiting in a collective.

torchrun starts each worker in a session of its own, so a launcher killed outright (``kill -9``, an
out-of-memory kill) would leave its workers training on, and writing, unseen. A worker therefore asks
Linux for SIGTERM when its launcher dies: the ranks stop as they do when torchrun itself is stopped,
rank 0 saving a checkpoint on the way out.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ddpmkit.errors import ConfigError
from ddpmkit.runtime.processes import signal_on_parent_death

T = TypeVar("T")

#: How long a collective may wait before the process group gives up (a last resort: ranks agree
#: to stop through their flags long before this).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (1 process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    #: under torchrun, the launcher's pid: its death is noticed at the next step even if PR_SET_PDEATHSIG's
    #: SIGTERM never arrives (seen: workers trained on for 120 s after their launcher's SIGKILL)
    launcher_pid: int | None = None

    def launcher_gone(self) -> bool:
        """Whether the torchrun that started this process has died (this process was re-parented)."""
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max of ``values`` over all ranks (the values themselves in one process)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (what the other ranks pass is ignored): rank 0 decides, every rank
        takes its decision. One process: ``value``."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank has come here."""
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return self.all_reduce([float(flag)], op="max")[0] > 0


def from_environment() -> World:
    """The world torchrun describes in the environment, or a single process."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    return World(rank=rank, size=size, local_rank=local, launcher_pid=launcher)


def join(world: World, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device (cuda:LOCAL_RANK on CUDA)."""
    if not world.enabled:
        return device
    stop_with_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return device


def stop_with_launcher() -> None:
    """Under torchrun: have this process sent SIGTERM when its launcher dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        signal_on_parent_death(signal.SIGTERM)


def leave(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int) -> int:
    """This rank's share of the global ``batch_size``; ConfigError unless it splits evenly."""
    if batch_size % world.size:
        raise ConfigError(
            f"train.batch_size = {batch_size} does not split evenly over {world.size} processes "
            "(it is the global batch: choose a multiple of the process count)"
        )
    return batch_size // world.size
