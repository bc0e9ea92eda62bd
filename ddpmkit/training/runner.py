"""The job of ``ddpmkit run``: set up the run directory, resume or start, train (the guide first), then
draw and write the samples. It reports through a :class:`RunReport`; the command prints."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ddpmkit.errors import EXIT_INTERRUPTED, DdpmkitError, HookFailed
from ddpmkit.run.checkpoint import (
    Checkpoint,
    check_compatible,
    checkpoints_dir,
    describe_run,
    latest_checkpoint,
    step_dirs,
)
from ddpmkit.run.components import Components, build_checked
from ddpmkit.run.config import RunConfig
from ddpmkit.run.data import Dataset, load_dataset, settle
from ddpmkit.run.events import EventDispatcher, RunInfo
from ddpmkit.run.guide import guide_config
from ddpmkit.run.lock import acquire, locked, release
from ddpmkit.runtime.device import pick_device
from ddpmkit.runtime.distributed import World, from_environment, join, leave
from ddpmkit.runtime.processes import Terminated
from ddpmkit.runtime.speed import AUTO, SpeedModes, require_compile
from ddpmkit.runtime.units import format_duration
from ddpmkit.sampling.draw import nearest_visited
from ddpmkit.sampling.images import write_images, write_trajectory
from ddpmkit.sampling.loaded import LoadedRun
from ddpmkit.training.autotune import announced, candidates, choose, is_auto, slow_mode_warning
from ddpmkit.training.budget import ModelChoice, TimePlan, choose_model, with_steps
from ddpmkit.training.budget import plan as budget_plan
from ddpmkit.training.loop import (
    CPU_WARN_SECONDS,
    RankStopped,
    Replan,
    TrainEvents,
    TrainResult,
    lr_decay_end,
    steps_per_epoch,
    total_steps,
    train,
)
from ddpmkit.training.preflight import snr_finding
from ddpmkit.version import __version__

OUTPUT_FILES = ("samples.png", "samples.npz", "trajectory.png")
#: which of train.smaller_models a time budget chose at the run's first start (kept on resume)
MODEL_CHOICE_FILE = "budget-model.json"
StepFn = Callable[[dict[str, Any]], None]
AdvanceFn = Callable[[int], None]


@contextmanager
def _no_progress(*args: Any) -> Iterator[Callable[..., None]]:
    yield lambda *a: None


def _ignore(text: str) -> None:
    pass


@dataclass
class RunReport:
    """Where a run's messages and progress go. ``training(total, completed)`` and ``sampling(total)``
    are context managers yielding the function to call after each step (metrics) or image-step count."""

    info: Callable[[str], None] = _ignore
    warn: Callable[[str], None] = _ignore
    training: Callable[[int, int], AbstractContextManager[StepFn]] = field(default=_no_progress)
    sampling: Callable[[int], AbstractContextManager[AdvanceFn]] = field(default=_no_progress)


def run_config(
    cfg: RunConfig, *, report: RunReport | None = None, fresh: bool = False, data_root: Path | None = None
) -> int:
    """Train (or resume) and sample; returns the process exit code (0, or 130 when interrupted).

    The run directory is locked for the duration: a second process on the same run refuses to start.
    Under torchrun every process calls this; rank 0 holds the lock, reports, writes and samples.
    """
    report = report or RunReport()
    cfg.check_extras()
    cfg = settle(cfg, data_root=data_root)  # auto image_size / channels: the data's own, before anything is built
    world = from_environment()
    if not world.enabled:
        created = [d for d in (cfg.run_dir, *cfg.run_dir.parents) if not d.exists()]
        try:
            _ensure_writable(cfg.run_dir)
            with locked(cfg.run_dir):
                return _run(
                    cfg,
                    report=report,
                    fresh=fresh,
                    data_root=data_root,
                    world=world,
                    device=pick_device(cfg.run.device),
                )
        except DdpmkitError:
            _remove_empty(created)  # a refusal before training leaves no empty run folder behind
            raise
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
            raise (
                error
                if error is not None
                else RankStopped("the first process could not start the run; this one stopped too")
            )
        try:
            return _run(
                cfg,
                report=report if world.is_main else RunReport(),
                fresh=fresh,
                data_root=data_root,
                world=world,
                device=device,
            )
        finally:
            if lock is not None:
                release(lock)
    finally:
        leave(world)


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
        raise DdpmkitError(
            f"{folder} exists but is not a folder (a file, a broken link or a link loop): "
            "move it away, or point run.dir elsewhere"
        )


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders this run created (deepest first), each only if nothing was written in it."""
    for folder in created:
        for sub in sorted(folder.glob("**/"), key=lambda p: len(p.parts), reverse=True) if folder.is_dir() else []:
            try:
                sub.rmdir()
            except OSError:
                pass


class _Silent:
    """The event dispatcher of ranks other than 0: plugins (metrics, TensorBoard) run on rank 0 only."""

    def emit(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class _Prepared:
    """A run ready to train: its data, components, the checkpoint it resumes from and its plan."""

    cfg: RunConfig
    dataset: Dataset
    built: Components
    resume: Checkpoint | None
    steps: int
    fingerprint: str
    #: what this start decided that its checkpoints record: the speed modes' choice, the time plan
    record: dict[str, Any] = field(default_factory=dict)


def _run(
    cfg: RunConfig, *, report: RunReport, fresh: bool, data_root: Path | None, world: World, device: torch.device
) -> int:
    record: dict[str, Any] = {}
    budget = cfg.train.time_budget
    plan: TimePlan | None = None  # a resumed run's recorded plan, else made when the main network starts
    if budget is not None:
        if fresh and world.is_main:
            _remove_outputs(cfg.run_dir)  # a fresh run plans anew
            (cfg.run_dir / MODEL_CHOICE_FILE).unlink(missing_ok=True)
        if cfg.train.smaller_models:
            cfg, record["budget_model"] = _sized(cfg, report=report, world=world, device=device)
        plan = _kept_plan(cfg, report=report, world=world, device=device)
    guide_took: float | None = None
    if cfg.trains_guide:  # autoguidance: the guide trains first, as a run of its own in RUN/guide
        guide = guide_config(cfg)
        report.info(
            f"guide for autoguidance (weight {cfg.guidance.weight:g}): {guide.train.max_steps:,} steps, trained first"
        )
        if world.is_main:
            _ensure_writable(guide.run_dir)
        from_scratch = fresh or latest_checkpoint(guide.run_dir) is None
        started = time.perf_counter()
        code = _run(guide, report=report, fresh=fresh, data_root=data_root, world=world, device=device)
        if code:
            return code
        if from_scratch:  # the budget counts the guide's training, not the measuring before it
            guide_took = time.perf_counter() - started
    cap = cfg.train.max_steps  # the config's own cap, which a re-plan keeps to
    if budget is not None:
        plan = plan or _final_plan(cfg, guide_took, report=report, world=world, device=device)
        cfg, record["time_plan"] = with_steps(cfg, plan.steps), plan.record()
    started = time.perf_counter()  # after the plan's measurement, which the budget does not count
    if fresh and world.is_main:
        _remove_outputs(cfg.run_dir)
    world.all_reduce([0.0])  # a barrier: no rank looks for checkpoints before --fresh removed them
    prepared = _prepare(cfg, report=report, data_root=data_root, world=world, device=device)
    prepared.record.update(record)
    info = RunInfo(cfg.run_dir, cfg, str(device), prepared.resume.step if prepared.resume else 0, prepared.steps)
    events = EventDispatcher(info) if world.is_main else _Silent()
    plans = {"made": plan}
    replan = _replan(plans, cfg, cap, started, info.start_step, report) if plan is not None else None
    result = _train(prepared, report=report, events=events, world=world, device=device, replan=replan)
    if result is None or result.interrupted:
        return EXIT_INTERRUPTED
    if plan is not None:
        took = time.perf_counter() - started
        used = took + (guide_took or 0.0)
        rate = (result.step - info.start_step) * cfg.train.batch_size / took if took > 0 else 0.0
        made = plans["made"]
        report.info(
            f"time budget {format_duration(plan.budget_s)}: this start trained for {format_duration(used)} "
            f"({used / plan.budget_s:.0%} of the budget); the main network at {rate:,.1f} images/s, "
            f"planned at {plan.images_per_s:,.1f}"
            + (
                f", re-planned at step {made.replanned_at:,} at {made.loop_images_per_s or 0:,.1f}"
                if made.replanned_at is not None
                else ""
            )
        )
    if not world.is_main:
        return 0
    _write_samples(prepared, result, report=report, events=events)
    return 0


def _replan(
    plans: dict[str, TimePlan], cfg: RunConfig, cap: int | None, started: float, start_step: int, report: RunReport
) -> Replan | None:
    """The loop's one re-plan of a time budget from its own images/s (None where the plan is kept as it is);
    the new plan goes into ``plans["made"]``."""
    made, batch = plans["made"], cfg.train.batch_size
    at = made.replan_step(batch, start_step, cfg.train.checkpoint_every)
    if at is None:
        return None

    def steps(step: int, images_per_s: float) -> tuple[int, dict[str, Any]]:
        before = start_step * batch / images_per_s if images_per_s > 0 else 0.0  # an earlier start's steps
        new = made.replanned(step, images_per_s, time.perf_counter() - started + before, batch, cap)
        plans["made"] = new
        report.info(
            f"  re-planned at step {step:,} from the loop's own {new.loop_images_per_s or 0:,.1f} images/s: "
            f"{new.steps:,} steps (planned {made.steps:,})"
        )
        return new.steps, {"time_plan": new.record()}

    return Replan(at, steps)


def _sized(
    cfg: RunConfig, *, report: RunReport, world: World, device: torch.device
) -> tuple[RunConfig, dict[str, Any]]:
    """``cfg`` with the model its time budget trains: chosen at the run's first start (rank 0 measures, every
    rank takes its choice) and kept from RUN/budget-model.json after it, so a resumed run trains the same model."""
    path = cfg.run_dir / MODEL_CHOICE_FILE
    models = [m.model_dump(mode="json") for m in cfg.train.smaller_models]
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = None
    if (
        isinstance(kept, dict)
        and kept.get("smaller_models") == models
        and kept.get("budget_s") == cfg.train.time_budget
        and kept.get("min_steps") == cfg.train.budget_min_steps
        and isinstance(kept.get("index"), int)
        and 0 <= kept["index"] < len(kept.get("steps") or [])
        and kept["index"] <= len(models)
    ):
        choice = ModelChoice(kept["index"], kept["steps"], kept["min_steps"])
        report.info(f"model: {choice.describe(cfg)}; kept from the run's first start")
        return cfg.with_smaller_model(choice.index), choice.record()
    choice = None
    if world.is_main:
        with announced(report.info):
            choice = choose_model(cfg, device)
        written = path.with_suffix(".tmp")  # replaced whole: a kill mid-write leaves the last choice or none
        written.write_text(json.dumps({**choice.record(), "smaller_models": models, "budget_s": cfg.train.time_budget}))
        os.replace(written, path)
    (index,) = world.all_reduce([float(choice.index if choice is not None else 0)])
    if choice is None:
        choice = ModelChoice(int(index), [], cfg.train.budget_min_steps or 0)
    else:
        report.info(f"model: {choice.describe(cfg)}")
    return cfg.with_smaller_model(choice.index), choice.record()


def _kept_plan(cfg: RunConfig, *, report: RunReport, world: World, device: torch.device) -> TimePlan | None:
    """The plan a resumed run recorded at its first start (kept, so resume stays exact); else None, having
    said the estimate of the whole plan (rank 0 measures the speed modes, or reads their cache)."""
    resume = latest_checkpoint(cfg.run_dir)
    recorded = resume.state.get("time_plan") if resume is not None else None
    if isinstance(recorded, dict) and recorded.get("budget_s") == cfg.train.time_budget:
        plan = TimePlan(**recorded)
        report.info(f"{plan.describe()} (planned at the run's first start)")
        return plan
    if world.is_main:
        with announced(report.info):
            estimate = budget_plan(cfg, device)
        report.info(
            f"{estimate.describe()} (an estimate: the steps are planned when "
            + ("the main network starts" if cfg.trains_guide else "training starts")
            + ")"
        )
    return None


def _final_plan(
    cfg: RunConfig, guide_took: float | None, *, report: RunReport, world: World, device: torch.device
) -> TimePlan:
    """The steps the run keeps, planned on rank 0 from the guide's time and steady training measured now
    (every rank takes them)."""
    plan = None
    if world.is_main:
        with announced(report.info):
            plan = budget_plan(cfg, device, final=True, guide_took=guide_took)
    shared = [float(plan.steps), plan.images_per_s, plan.guide_s, plan.setup_s] if plan is not None else [0.0] * 4
    steps, ips, guide_s, setup_s = world.all_reduce(shared)
    if plan is None:  # the same plan as rank 0's: every rank re-plans at the same step
        return TimePlan(cfg.train.time_budget, int(steps), ips, guide_s, setup_s, cfg.trains_guide)
    report.info(plan.describe())
    return plan


def _remove_outputs(run_dir: Path) -> None:
    """--fresh: the checkpoints, metrics and samples of an earlier run go."""
    shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)
    for name in ("metrics.jsonl", *OUTPUT_FILES):
        (run_dir / name).unlink(missing_ok=True)


def _prepare(
    cfg: RunConfig, *, report: RunReport, data_root: Path | None, world: World, device: torch.device
) -> _Prepared:
    """Find the checkpoint to resume from, load the data, build and smoke-test the components, and say the plan."""
    resume = latest_checkpoint(cfg.run_dir, report.warn)
    conditional = cfg.conditioning.enabled
    dataset = load_dataset(cfg.data, root_override=data_root, seed=cfg.run.seed, labelled=conditional)
    fingerprint = dataset.fingerprint(with_labels=conditional)
    built = build_checked(cfg, dataset.classes if conditional else None)
    cfg, speed = _resolve_speed(cfg, resume, device=device, world=world, report=report)
    if resume is not None:
        check_compatible(resume, cfg, fingerprint)
    schedule_check = snr_finding(built)  # validate's warning, said again where the run starts
    if schedule_check.warning:
        report.warn(schedule_check.warning)
    if world.is_main:
        (cfg.run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    steps = total_steps(cfg, len(dataset))
    end = lr_decay_end(cfg, resume, steps)
    if cfg.train.lr_decay == "cosine" and steps > end:
        report.warn(
            f"the run's cosine learning-rate decay ended at step {end:,}, as first planned; the steps up to "
            f"{steps:,} train at train.lr_min = {cfg.train.lr_min:g} (--fresh starts a new schedule)"
        )
    if cfg.train.batch_size > len(dataset):
        report.warn(
            f"train.batch_size = {cfg.train.batch_size:,} is larger than the dataset ({len(dataset):,} images): "
            f"every step trains on the whole dataset, a batch of {len(dataset):,}"
        )
    model, tc = built.denoiser, cfg.train
    report.info(
        f"ddpmkit run {cfg.run_dir}: {dataset.description}, {len(dataset):,} images\n"
        f"  device {device}, {cfg.denoiser.name} {model.num_parameters():,} parameters predicting {model.prediction}, "
        f"{SpeedModes.for_run(tc, device).describe()}\n"
        f"  {steps_per_epoch(len(dataset), tc.batch_size):,} steps of batch {min(tc.batch_size, len(dataset))} per "
        "epoch; "
        f"{steps:,} steps in all ("
        + ("train.max_steps" if tc.max_steps is not None and steps == tc.max_steps else f"{tc.epochs:,} epochs")
        + (" planned by the time budget" if tc.time_budget is not None else "")
        + ")"
        + (f"\n  resuming from {resume.path} (step {resume.step:,})" if resume is not None else "")
    )
    return _Prepared(cfg, dataset, built, resume, steps, fingerprint, {"speed": speed} if speed else {})


def _resolve_speed(
    cfg: RunConfig, resume: Checkpoint | None, *, device: torch.device, world: World, report: RunReport
) -> tuple[RunConfig, dict[str, Any] | None]:
    """``cfg`` with its ``auto`` speed modes made concrete: kept from the checkpoint when resuming (so resume
    stays exact), else measured (rank 0 measures; every rank takes its choice). An explicit mode measured to
    be much slower than another exact one is warned about; one that cannot run here is an error before anything."""
    if cfg.train.compile is True:
        require_compile(device)
    warning = slow_mode_warning(cfg, device) if world.is_main else None
    if warning:
        report.warn(warning)
    if not is_auto(cfg.train):
        return cfg, None
    if resume is not None:
        saved = resume.schema.config.get("train", {})
        kept = {
            key: saved.get(key, default)
            for key, default in (("precision", "fp32"), ("channels_last", False), ("compile", False))
        }
        cfg = _with_train(cfg, **{k: v for k, v in kept.items() if getattr(cfg.train, k) == AUTO})
        if cfg.train.compile is True:
            require_compile(device, kept=True)
        report.info(f"  speed modes kept from the run's start: {SpeedModes.for_run(cfg.train, device).describe()}")
        return cfg, resume.state.get("speed")
    options, _ = candidates(cfg, device)
    options += [replace(m, compile=True) for m in options if not m.compile]
    choice = None
    if world.is_main:
        with announced(report.info):
            choice = choose(cfg, device)
    index = options.index(choice.modes) if choice is not None else 0
    (index_sum,) = world.all_reduce([float(index)])  # rank 0's choice, on every rank (the others add 0)
    modes = options[int(index_sum)]
    if choice is not None:
        report.info("  " + choice.reason())
    cfg = _with_train(cfg, precision=modes.precision, channels_last=modes.channels_last, compile=modes.compile)
    return cfg, choice.record() if choice is not None else None


def _with_train(cfg: RunConfig, **settings: Any) -> RunConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=settings)})


def _train(
    prepared: _Prepared,
    *,
    report: RunReport,
    events: Any,
    world: World,
    device: torch.device,
    replan: Replan | None = None,
) -> TrainResult | None:
    """The training loop with its progress, events and the interrupt and failure policies; None when a
    second interrupt stopped it at once."""
    cfg, resume = prepared.cfg, prepared.resume
    reached: dict[str, Any] = {"step": resume.step if resume else 0}
    started = time.perf_counter()

    def on_measured(images_per_s: float, eta_s: float) -> None:
        report.info(f"  measured {images_per_s:.1f} images/s: about {format_duration(eta_s)} of training left")
        if device.type == "cpu" and eta_s > CPU_WARN_SECONDS:
            report.warn(
                f"this run needs about {format_duration(eta_s)} on this CPU; "
                "configs/mnist-cpu.toml is sized for a CPU (about 15 minutes on 2 cores)"
            )

    events.emit("train_start")
    try:
        with report.training(prepared.steps, reached["step"]) as show_step:

            def on_step(metrics: dict[str, Any]) -> None:
                if prepared.record and reached.get("first", True):  # the first record of a start says its plan
                    metrics = {**metrics, **prepared.record}
                    reached["first"] = False
                reached["step"] = metrics["step"]
                events.emit("step_end", step=metrics["step"], metrics=metrics)
                show_step(metrics)

            result = train(
                cfg,
                model=prepared.built.denoiser,
                schedule=prepared.built.schedule,
                dataset=prepared.dataset,
                device=device,
                run_dir=cfg.run_dir,
                checkpoint_state={
                    **describe_run(cfg, prepared.built, prepared.fingerprint, __version__, prepared.dataset.classes),
                    **prepared.record,
                },
                resume=resume,
                denoiser_component=prepared.built.refs["denoiser"],
                world=world,
                events=TrainEvents(
                    on_step=on_step,
                    on_measured=on_measured,
                    replan=replan,
                    on_checkpoint=lambda path, step: events.emit("checkpoint_written", step=step, path=path),
                ),
            )
    except BaseException as exc:
        try:  # let the plugins close their files; the original error is the one to report
            events.emit("train_end", step=reached["step"], interrupted=True)
        except HookFailed:
            pass
        if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C, or SIGTERM outside the loop: stopped at once
            done = step_dirs(cfg.run_dir)
            why = "SIGTERM" if isinstance(exc, Terminated) else "a second interrupt"
            report.info(
                f"stopped at once ({why}) near step {reached['step']:,}; "
                + (
                    f"the last complete checkpoint is {done[-1]}: run the same command again to resume from it."
                    if done
                    else "no checkpoint was written yet."
                )
            )
            return None
        raise
    try:
        events.emit("train_end", step=result.step, interrupted=result.interrupted)
    except HookFailed:
        if result.failure is None:
            raise
    if result.failure is not None:
        raise result.failure
    if result.interrupted:
        report.info(
            f"interrupted at step {result.step:,}; checkpoint {result.last_checkpoint}. "
            "Run the same command again to resume."
        )
        return result
    report.info(
        f"trained to step {result.step:,} in {format_duration(time.perf_counter() - started)}"
        + (f" on {world.size} processes" if world.enabled else "")
    )
    return result


def _write_samples(prepared: _Prepared, result: TrainResult, *, report: RunReport, events: Any) -> None:
    """One pass draws ``sample.num_images`` images, the first few of which also give the denoising strip."""
    cfg, sc, run_dir = prepared.cfg, prepared.cfg.sample, prepared.cfg.run_dir
    count = max(sc.num_images, sc.trajectory_images if sc.trajectory_steps else 0)
    visited = prepared.built.timesteps()
    shown = nearest_visited(sc.trajectory_steps, visited) if sc.trajectory_images else []
    if shown and set(shown) != set(sc.trajectory_steps):
        report.info(
            f"  trajectory.png: {cfg.sampler.name} visits {len(visited)} of {cfg.num_timesteps} steps; "
            f"showing the visited t nearest to those asked for: {', '.join(map(str, shown))}"
        )
    if not count:  # nothing to draw (the guide's run, or num_images = 0)
        events.emit("samples_written", paths=[])
        return
    weights = "ema" if sc.use_ema else "model"
    built = prepared.built
    trained = LoadedRun(
        cfg,
        Components(built.schedule, result.ema_model if sc.use_ema else result.model, built.sampler, built.refs),
        run_dir=run_dir,
        step=result.step,
        weights=weights,
        classes=prepared.dataset.classes,
    )
    labels = trained.labels(count) if trained.conditional else None
    started = time.perf_counter()
    with report.sampling(count * len(visited)) as advance:
        images, captured = trained.draw(
            count, seed=sc.seed, batch_size=sc.batch_size, progress=advance, capture_steps=shown or None, labels=labels
        )
    if sc.num_images:
        shown_labels = labels[: sc.num_images] if labels is not None else None
        for name in ("samples.png", "samples.npz"):
            write_images(images[: sc.num_images], run_dir / name, labels=shown_labels, classes=trained.classes)
    if sc.trajectory_images and captured:
        write_trajectory({t: x[: sc.trajectory_images] for t, x in captured.items()}, run_dir / "trajectory.png")
    written = [run_dir / name for name in OUTPUT_FILES if (run_dir / name).exists()]
    events.emit("samples_written", paths=written)
    report.info(f"sampled in {format_duration(time.perf_counter() - started)}; wrote " + ", ".join(map(str, written)))
