"""``ddpmkit run``: train (or resume) the run a config describes, then sample from it; ``--nproc`` launches torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from ddpmkit.commands.app import (
    DataRootOption,
    DeviceOption,
    SetOption,
    app,
    console,
    debug,
    say,
    user_errors,
    warn,
    with_data_root,
    with_device,
)
from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.runtime.processes import sigterm_forwarded

#: The words of the line every other rank prints when one rank's error stopped it.
RANK_STOPPED_HINT = "this one stopped too"


@app.command()
@user_errors
def run(
    config: Path = typer.Argument(..., help="The run's TOML config."),
    set_: list[str] | None = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run's checkpoints and start over."),
    data_root: Path | None = DataRootOption,
    device: str | None = DeviceOption,
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Train with N processes on this machine (launches torchrun; DDP, gloo on CPU, NCCL on CUDA).",
    ),
) -> None:
    """Train (or resume) the run a config describes, then sample from it."""
    from functools import partial

    from ddpmkit.commands.progress import sampling_progress, training_progress
    from ddpmkit.run.config import load_config
    from ddpmkit.training.runner import RunReport, run_config

    if nproc > 1:
        raise typer.Exit(
            _launch_processes(config, list(set_ or []), nproc, fresh=fresh, data_root=data_root, device=device)
        )
    cfg = load_config(config, with_data_root(with_device(set_, device), data_root))
    report = RunReport(
        info=say, warn=warn, training=partial(training_progress, console), sampling=partial(sampling_progress, console)
    )
    code = run_config(cfg, report=report, fresh=fresh)
    if code:
        raise typer.Exit(code)


def _launch_processes(
    config: Path, overrides: list[str], nproc: int, *, fresh: bool, data_root: Path | None, device: str | None
) -> int:
    """``ddpmkit run`` under torchrun with ``nproc`` processes, the cores shared out between them."""
    from ddpmkit.run.config import load_config

    if "WORLD_SIZE" in os.environ:
        raise DdpmkitError("--nproc inside torchrun: use one or the other")
    cfg = load_config(config, with_data_root(overrides, data_root))  # a mistake is one line here, not one per process
    _check_process_count(nproc, device or cfg.run.device)
    from ddpmkit.runtime.distributed import World, check_batch

    check_batch(World(size=nproc), cfg.train.batch_size)  # here, before starting nproc processes to say it
    from ddpmkit.run.lock import check_free

    check_free(cfg.run_dir)  # likewise a run another process is writing
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ddpmkit",
        "run",
        str(config),
    ]
    args += [a for item in overrides for a in ("--set", item)]
    args += (["--fresh"] if fresh else []) + (["--data-root", str(data_root)] if data_root else [])
    args += ["--device", device] if device else []
    # the cores shared out between the processes (torchrun would pick 1 and print a banner about it)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    return _launch(args, env)


#: What one training process costs before its model and data: torch, the plugins, the gloo group.
PROCESS_BYTES = 400 * 2**20


def _check_process_count(nproc: int, device: str) -> None:
    """Refuse more processes than the machine has GPUs (on CUDA: one each) or memory for; warn about more
    processes than CPU cores (they share them, and each step then waits for the slowest)."""
    from ddpmkit.runtime.device import pick_device
    from ddpmkit.runtime.limits import available_memory
    from ddpmkit.runtime.units import format_bytes

    dev = pick_device(device)
    needed, free = nproc * PROCESS_BYTES, available_memory()
    cores = os.cpu_count() or 1
    have = f"this machine has {cores} CPU cores and {format_bytes(free)} of memory available"
    if dev.type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ConfigError(f"--nproc {nproc}: this machine has {gpus} GPUs, and each process needs its own")
    if needed > free:
        raise ConfigError(
            f"--nproc {nproc}: {nproc} processes would need about {format_bytes(needed)} before the "
            f"model and data, and {have}; at most --nproc {max(1, min(cores, free // PROCESS_BYTES))}"
        )
    if dev.type == "cpu" and nproc > cores:
        warn(f"--nproc {nproc}: {have}: the processes share the cores and train slower than --nproc {cores}")


def _die_with_parent() -> None:
    """In torchrun's process, before it starts: get SIGTERM when ddpmkit dies (even by SIGKILL), so that a
    killed launch leaves no torchrun and no workers behind (torchrun stops its workers on SIGTERM)."""
    import signal

    from ddpmkit.runtime.processes import signal_on_parent_death

    signal_on_parent_death(signal.SIGTERM)


def _launch(args: list[str], env: dict[str, str]) -> int:
    """Run torchrun; when a worker fails with ddpmkit's one-line error, show that line once (exit code 2)
    instead of torchrun's own traceback about a failed child. Anything else is shown whole. SIGTERM is passed
    on to torchrun, which stops its workers (each checkpoints), and waited for."""
    proc = subprocess.Popen(
        args,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    with proc, sigterm_forwarded(proc):
        _, stderr = proc.communicate()
    lines = stderr.splitlines()
    warnings_ = list(dict.fromkeys(line for line in lines if line.startswith("warning:")))
    errors = list(dict.fromkeys(line for line in lines if line.startswith("error:")))
    if proc.returncode == 0 or not errors or debug():
        sys.stderr.write(stderr)
        return proc.returncode
    # every rank reports; the cause is the line that is not a "stopped because another stopped"
    causes = [line for line in errors if RANK_STOPPED_HINT not in line] or errors
    sys.stderr.write("\n".join(warnings_ + causes[:1]) + "\n")
    return 2
