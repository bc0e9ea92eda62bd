"""`ddpmkit run`: set up the run directory, resume or start, train, then write samples."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__
from .checkpoint import check_compatible, checkpoints_dir, describe_run, latest_checkpoint, step_dirs
from .config import RunConfig
from .data import load_dataset
from .device import pick_device
from .errors import EXIT_INTERRUPTED, DdpmkitError, HookFailed
from .events import EventDispatcher, RunInfo
from .factory import build_checked
from .guidance import guide_config, guided
from .distributed import World, from_environment, join, leave
from .runlock import acquire, locked, release
from .speed import SpeedModes
from .sampling import generate, nearest_visited, sampling_progress, write_images, write_trajectory
from .train import CPU_WARN_SECONDS, RankStopped, TrainEvents, steps_per_epoch, total_steps, train

OUTPUT_FILES = ("samples.png", "samples.npz", "trajectory.png")


def _ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DdpmkitError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None
    folder = checkpoints_dir(run_dir)
    if os.path.lexists(folder) and not folder.is_dir():  # found now, not at the first checkpoint
        raise DdpmkitError(f"{folder} exists but is not a folder (a file, a broken link or a link loop): "
                           "move it away, or point run.dir elsewhere")


def _format_duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def run_config(cfg: RunConfig, *, console: Console, fresh: bool = False, data_root: Path | None = None) -> int:
    """Train (or resume) and sample; returns the process exit code (0, or 130 when interrupted).

    The run directory is locked for the duration: a second process on the same run refuses to start.
    Under torchrun every process calls this; rank 0 holds the lock, prints, writes and samples.
    """
    world = from_environment()
    if not world.enabled:
        _ensure_writable(cfg.run_dir)
        with locked(cfg.run_dir):
            return _run_config(cfg, console=console, fresh=fresh, data_root=data_root,
                               world=world, device=pick_device(cfg.run.device))
    device = join(world, pick_device(cfg.run.device))
    try:
        lock, error = None, None
        if world.is_main:
            try:
                _ensure_writable(cfg.run_dir)
                lock = acquire(cfg.run_dir)
            except DdpmkitError as exc:
                error = exc
        if world.any(error is not None):  # every rank learns whether rank 0 could start
            raise error if error is not None else RankStopped("the first process could not start the run; this one stopped too")
        try:
            quiet = console if world.is_main else Console(file=io.StringIO())
            return _run_config(cfg, console=quiet, fresh=fresh, data_root=data_root, world=world, device=device)
        finally:
            if lock is not None:
                release(lock)
    finally:
        leave(world)


class _Silent:
    """The event dispatcher of ranks other than 0: plugins (metrics, TensorBoard) run on rank 0 only."""

    def emit(self, *args: Any, **kwargs: Any) -> None:
        pass


def _run_config(
    cfg: RunConfig, *, console: Console, fresh: bool, data_root: Path | None, world: World, device: torch.device
) -> int:
    run_dir = cfg.run_dir
    if cfg.guidance.enabled:  # autoguidance: the guide trains first, as a run of its own in RUN/guide
        guide = guide_config(cfg)
        console.print(f"[bold]guide[/] for autoguidance (weight {cfg.guidance.weight:g}): "
                      f"{guide.train.max_steps:,} steps, trained first", highlight=False)
        if world.is_main:
            _ensure_writable(guide.run_dir)
        code = _run_config(guide, console=console, fresh=fresh, data_root=data_root, world=world, device=device)
        if code:
            return code
    if fresh and world.is_main:
        shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)
        for name in ("metrics.jsonl", *OUTPUT_FILES):
            (run_dir / name).unlink(missing_ok=True)
    world.all_reduce([0.0])  # a barrier: no rank looks for checkpoints before --fresh removed them

    warn = lambda m: console.print(f"[yellow]warning:[/] {m}", highlight=False)  # noqa: E731
    resume = latest_checkpoint(run_dir, warn)

    dataset = load_dataset(cfg.data, root_override=data_root, seed=cfg.run.seed)
    fingerprint = dataset.fingerprint()
    if resume is not None:
        check_compatible(resume, cfg, fingerprint)

    built = build_checked(cfg)
    schedule, model, sampler = built.schedule, built.denoiser, built.sampler
    if world.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))

    params = model.num_parameters()
    steps = total_steps(cfg, len(dataset))
    if cfg.train.batch_size > len(dataset):
        warn(f"train.batch_size = {cfg.train.batch_size:,} is larger than the dataset ({len(dataset):,} images): "
             f"every step trains on the whole dataset, a batch of {len(dataset):,}")
    console.print(
        f"[bold]ddpmkit run[/] {run_dir}: {dataset.description}, {len(dataset):,} images\n"
        f"  device {device}, {cfg.denoiser.name} {params:,} parameters predicting {model.prediction}, "
        f"{SpeedModes.for_run(cfg.train, device).describe()}\n"
        f"  {steps_per_epoch(len(dataset), cfg.train.batch_size):,} steps of batch "
        f"{min(cfg.train.batch_size, len(dataset))} per epoch; "
        f"{steps:,} steps in all ({cfg.train.epochs} epochs"
        + (f", at most {cfg.train.max_steps:,} steps)" if cfg.train.max_steps is not None else ")")
        + (f"\n  resuming from {resume.path} (step {resume.step:,})" if resume is not None else ""),
        highlight=False,
    )

    state = describe_run(cfg, built, fingerprint, __version__)
    started = time.perf_counter()
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
        TimeRemainingColumn(), console=console,
    )
    smoothed = {"loss": None}
    reached = {"step": resume.step if resume else 0}
    info = RunInfo(run_dir, cfg, str(device), resume.step if resume else 0, steps)
    events = EventDispatcher(info) if world.is_main else _Silent()

    def on_step(m: dict[str, Any]) -> None:
        reached["step"] = m["step"]
        events.emit("step_end", step=m["step"], metrics=m)
        prev = smoothed["loss"]
        smoothed["loss"] = m["loss"] if prev is None else 0.98 * prev + 0.02 * m["loss"]
        progress.update(task, completed=m["step"], epoch=m["epoch"] + 1, loss=smoothed["loss"], ips=m["images_per_s"])

    def on_measured(images_per_s: float, eta_s: float) -> None:
        progress.console.print(
            f"  measured {images_per_s:.1f} images/s: about {_format_duration(eta_s)} of training left", highlight=False
        )
        if device.type == "cpu" and eta_s > CPU_WARN_SECONDS:
            progress.console.print(
                f"[yellow]warning:[/] this run needs about {_format_duration(eta_s)} on this CPU; "
                "configs/mnist-cpu.toml is sized for a CPU (about 15 minutes on 2 cores)", highlight=False
            )

    def on_checkpoint(path: Path, step: int) -> None:
        events.emit("checkpoint_written", step=step, path=path)

    task = progress.add_task("train", total=steps, completed=resume.step if resume else 0,
                             epoch=1, loss=float("nan"), ips=0.0)
    events.emit("train_start")
    try:
        with progress:
            result = train(
                cfg, model=model, schedule=schedule, dataset=dataset, device=device, run_dir=run_dir,
                checkpoint_state=state, resume=resume, denoiser_component=built.refs["denoiser"],
                events=TrainEvents(on_step=on_step, on_checkpoint=on_checkpoint, on_measured=on_measured),
                world=world,
            )
    except BaseException as exc:
        try:  # let the plugins close their files; the original error is the one to report
            events.emit("train_end", step=reached["step"], interrupted=True)
        except HookFailed:
            pass
        if isinstance(exc, KeyboardInterrupt):  # the second Ctrl-C: stopped at once, mid-step or mid-write
            done = step_dirs(run_dir)
            console.print(
                f"[yellow]stopped at once[/] (a second interrupt) near step {reached['step']:,}; "
                + (f"the last complete checkpoint is {done[-1]}: run the same command again to resume from it."
                   if done else "no checkpoint was written yet.")
            )
            return EXIT_INTERRUPTED
        raise
    try:
        events.emit("train_end", step=result.step, interrupted=result.interrupted)
    except HookFailed:
        if result.failure is None:
            raise
    if result.failure is not None:
        raise result.failure
    train_time = time.perf_counter() - started
    if result.interrupted:
        console.print(
            f"[yellow]interrupted[/] at step {result.step:,}; checkpoint {result.last_checkpoint}. "
            "Run the same command again to resume."
        )
        return EXIT_INTERRUPTED
    console.print(f"trained to step {result.step:,} in {_format_duration(train_time)}"
                  + (f" on {world.size} processes" if world.enabled else ""))
    if not world.is_main:
        return 0

    sc = cfg.sample
    started = time.perf_counter()
    # one pass draws the samples; the first few of them also give the denoising strip
    count = max(sc.num_images, sc.trajectory_images if sc.trajectory_steps else 0)
    visited = built.timesteps()
    shown = nearest_visited(sc.trajectory_steps, visited) if sc.trajectory_images else []
    if shown and set(shown) != set(sc.trajectory_steps):
        console.print(
            f"  trajectory.png: {cfg.sampler.name} visits {len(visited)} of {cfg.num_timesteps} steps; "
            f"showing the visited t nearest to those asked for: {', '.join(map(str, shown))}",
            highlight=False,
        )
    if not count:  # nothing to draw (the guide's run, or num_images = 0)
        events.emit("samples_written", paths=[])
        return 0
    ema_or_raw = guided(result.ema_model if sc.use_ema else result.model, cfg, run_dir, schedule,
                        weights="ema" if sc.use_ema else "model")
    with sampling_progress(console, count * len(visited), "sampling") as advance:
        images, captured = generate(
            ema_or_raw, schedule, sampler, count, batch_size=sc.batch_size, seed=sc.seed,
            image_shape=cfg.image_shape, modes=SpeedModes.for_run(cfg.train, ema_or_raw.device),
            capture_steps=shown or None, progress=advance, sampler_component=built.refs["sampler"],
        )
    if sc.num_images:
        write_images(images[: sc.num_images], run_dir / "samples.png")
        write_images(images[: sc.num_images], run_dir / "samples.npz")
    if sc.trajectory_images and captured:
        write_trajectory({t: x[: sc.trajectory_images] for t, x in captured.items()}, run_dir / "trajectory.png")
    written = [run_dir / name for name in OUTPUT_FILES if (run_dir / name).exists()]
    events.emit("samples_written", paths=written)
    console.print(
        f"sampled in {_format_duration(time.perf_counter() - started)}; wrote "
        + ", ".join(str(p) for p in written)
    )
    return 0
