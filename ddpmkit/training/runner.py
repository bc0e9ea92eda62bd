"""The job of ``ddpmkit run``: set up the run directory, resume or start, train (the guide first), then
draw and write the samples. It reports through a :class:`RunReport`; the command prints."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpmkit.errors import EXIT_INTERRUPTED, DdpmkitError, HookFailed
from ddpmkit.hookspecs import METRICS_FILE
from ddpmkit.run.checkpoint import (
    Checkpoint,
    StartRecord,
    check_compatible,
    checkpoints_dir,
    describe_run,
    forget_start,
    kept_start,
    latest_checkpoint,
    save_start,
    step_dirs,
)
from ddpmkit.run.components import Components, build_checked
from ddpmkit.run.config import RunConfig
from ddpmkit.run.data import Dataset, dataset_classes, load_dataset, settle
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
from ddpmkit.training.autotune import announced, choose, is_auto, slow_mode_warning
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
from ddpmkit.training.preflight import guidance_warning, snr_finding
from ddpmkit.version import __version__

OUTPUT_FILES = ("samples.png", "samples.npz", "trajectory.png")
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


def run_config(cfg: RunConfig, *, report: RunReport | None = None, fresh: bool = False) -> int:
    """Train (or resume) and sample; returns the process exit code (0, or 130 when interrupted).

    The run directory is locked for the duration: a second process on the same run refuses to start.
    Under torchrun every process calls this; rank 0 holds the lock, reports, writes and samples.
    """
    cfg.check_extras()
    cfg = settle(cfg)  # auto image_size / channels: the data's own, before anything is built
    return RunJob(cfg, report=report or RunReport(), fresh=fresh).run()


class RunJob:
    """One start of a run: its config, where it reports, and this process's place among the training processes.

    :meth:`run` locks the run folder and goes through the phases; the guide of an autoguided run is a child job
    in ``RUN/guide``. What the start decides (the model, the time plan, the speed modes) is :attr:`start`, the
    record every checkpoint carries, so that a resume decides nothing again.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        report: RunReport,
        fresh: bool = False,
        world: World | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.report = report
        self.fresh = fresh
        self.world = world or from_environment()
        self.device = device or pick_device(cfg.run.device)
        self.start = StartRecord()
        #: a time budget's plan: kept from the first start, else made when this network starts training
        self.plan: TimePlan | None = None
        #: the config's own cap on the steps, which a re-plan keeps to
        self.cap = cfg.train.max_steps
        #: seconds the guide trained in this start (counted in the budget)
        self.guide_took: float | None = None
        #: when the training (not the measuring before it) of this network began
        self.started = 0.0
        #: the step this start resumed from
        self.start_step = 0
        #: whether this start wrote the run's start.json (removed again if the start is refused)
        self.wrote_start = False
        self.events: EventDispatcher | _Silent = _Silent()

    @property
    def budgeted(self) -> bool:
        return self.cfg.train.time_budget is not None

    # --- the whole job ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Lock the run folder, go through the phases and release it; under torchrun, rank 0 holds the lock."""
        if not self.world.enabled:
            return self._run_alone()
        self.device = join(self.world, self.device)
        if not self.world.is_main:
            self.report = RunReport()  # rank 0 alone reports
        try:
            return self._run_among_ranks()
        finally:
            leave(self.world)

    def phases(self) -> int:
        """Choose the model, estimate, train the guide, plan, prepare, train, write samples; the exit code."""
        if self.budgeted:
            self.forget_if_fresh()
            if self.cfg.train.smaller_models:
                self.choose_model()
            self.keep_or_estimate_plan()
        if self.cfg.trains_guide:
            code = self.train_guide()
            if code:
                return code
        if self.budgeted:
            self.plan_steps()
        self.begin()
        prepared = self.prepare()
        result = self.train(prepared)
        if result is None or result.interrupted:
            return EXIT_INTERRUPTED
        if self.plan is not None:
            self.say_budget_used(result)
        if self.world.is_main:
            self.write_samples(prepared, result)
        return 0

    def _run_alone(self) -> int:
        run_dir = self.cfg.run_dir
        created = [d for d in (run_dir, *run_dir.parents) if not _exists(d)]
        try:
            _ensure_writable(run_dir)
            with locked(run_dir):
                return self.phases()
        except DdpmkitError:
            self._undo_refused_start(created)
            raise

    def _run_among_ranks(self) -> int:
        lock, error = None, None
        if self.world.is_main:
            try:
                _ensure_writable(self.cfg.run_dir)
                lock = acquire(self.cfg.run_dir)
            except DdpmkitError as exc:
                error = exc
        if self.world.any(error is not None):  # every rank learns whether rank 0 could start
            if error is not None:
                raise error
            raise RankStopped("the first process could not start the run; this one stopped too")
        try:
            return self.phases()
        except DdpmkitError:
            if self.world.is_main:
                self._undo_refused_start([])
            raise
        finally:
            if lock is not None:
                release(lock)

    def _undo_refused_start(self, created: list[Path]) -> None:
        """A refusal before anything trained leaves nothing behind: no empty run folder, no record of a start. Best
        effort: the refusal is what the user sees (a run folder whose name is too long cannot be looked into)."""
        try:
            trained = step_dirs(self.cfg.run_dir) or (
                self.cfg.trains_guide and step_dirs(guide_config(self.cfg).run_dir)
            )
            if self.wrote_start and not trained:
                forget_start(self.cfg.run_dir)
            _remove_empty(created)
        except OSError:
            pass

    # --- the phases -----------------------------------------------------------------------------------------

    def forget_if_fresh(self) -> None:
        """--fresh with a time budget: the earlier run's outputs and its start's decisions go (it plans anew)."""
        if self.fresh and self.world.is_main:
            _remove_outputs(self.cfg.run_dir)
            forget_start(self.cfg.run_dir)

    def choose_model(self) -> None:
        """The model the time budget trains: chosen at the run's first start (rank 0 measures, every rank takes
        its choice) and kept after it, so that a resumed run trains the same model."""
        cfg, tc = self.cfg, self.cfg.train
        chosen_for = {
            "smaller_models": [m.model_dump(mode="json") for m in tc.smaller_models],
            "budget_s": tc.time_budget,
            "min_steps": tc.budget_min_steps,
        }
        choice = _kept_choice(kept_start(cfg.run_dir, None).budget_model or {}, chosen_for)
        if choice is not None:
            self.report.info(f"model: {choice.describe(cfg)}; kept from the run's first start")
            self.start.budget_model = {**choice.record(), **chosen_for}
        else:
            if self.world.is_main:
                with announced(self.report.info):
                    choice = choose_model(cfg, self.device)
            choice = self.world.from_main(choice)
            self.report.info(f"model: {choice.describe(cfg)}")
            self.start.budget_model = {**choice.record(), **chosen_for}
            if self.world.is_main:  # recorded before the guide trains: it trains the chosen model too
                save_start(cfg.run_dir, self.start)
                self.wrote_start = True
        self.cfg = cfg.with_smaller_model(choice.index)
        self.cap = self.cfg.train.max_steps

    def keep_or_estimate_plan(self) -> None:
        """A resumed run keeps the plan its first start made (so resume stays exact); else the estimate of the
        whole plan is said (rank 0 measures the speed modes, or reads their cache)."""
        cfg = self.cfg
        recorded = kept_start(cfg.run_dir, latest_checkpoint(cfg.run_dir)).time_plan
        if recorded is not None and recorded.get("budget_s") == cfg.train.time_budget:
            self.plan = TimePlan(**recorded)
            self.report.info(f"{self.plan.describe()} (planned at the run's first start)")
            return
        if self.world.is_main:
            with announced(self.report.info):
                estimate = budget_plan(cfg, self.device)
            when = "the main network starts" if cfg.trains_guide else "training starts"
            self.report.info(f"{estimate.describe()} (an estimate: the steps are planned when {when})")

    def train_guide(self) -> int:
        """Autoguidance: the guide trains first, as a run of its own in RUN/guide (a child job)."""
        guide = guide_config(self.cfg)
        self.report.info(
            f"guide for autoguidance (weight {self.cfg.guidance.weight:g}): "
            f"{guide.train.max_steps:,} steps, trained first"
        )
        if self.world.is_main:
            _ensure_writable(guide.run_dir)
        from_scratch = self.fresh or latest_checkpoint(guide.run_dir) is None
        started = time.perf_counter()
        child = RunJob(guide, report=self.report, fresh=self.fresh, world=self.world, device=self.device)
        code = child.phases()
        if not code and from_scratch:  # the budget counts the guide's training, not the measuring before it
            self.guide_took = time.perf_counter() - started
        return code

    def plan_steps(self) -> None:
        """The steps the run keeps: the first start's plan, else planned now on rank 0 from the guide's time and
        steady training measured now (every rank takes them)."""
        if self.plan is None:
            plan = None
            if self.world.is_main:
                with announced(self.report.info):
                    plan = budget_plan(self.cfg, self.device, final=True, guide_took=self.guide_took)
            self.plan = self.world.from_main(plan)
            self.report.info(self.plan.describe())
        self.cfg = with_steps(self.cfg, self.plan.steps)
        self.start.time_plan = self.plan.record()

    def begin(self) -> None:
        """The budget's clock starts (after the plan's measurement, which it does not count); --fresh removes the
        earlier run's checkpoints, and no rank looks for them before that."""
        self.started = time.perf_counter()
        if self.fresh and self.world.is_main:
            _remove_outputs(self.cfg.run_dir)
        self.world.barrier()

    def prepare(self) -> _Prepared:
        """Find the checkpoint to resume from, load the data, build and smoke-test the components, settle the
        speed modes, and say the plan."""
        report, device = self.report, self.device
        resume = latest_checkpoint(self.cfg.run_dir, report.warn)
        conditional = self.cfg.conditioning.enabled
        # cheap checks first: the components are built and tried (every option, the image shape, a forward pass)
        # before the images are read, which takes a minute for a large image folder
        classes = dataset_classes(self.cfg.data) if conditional else None
        built = build_checked(self.cfg, classes) if classes or not conditional else None
        dataset = load_dataset(self.cfg.data, seed=self.cfg.run.seed, labelled=conditional)
        if built is None or (conditional and dataset.classes != classes):  # the labels the images hold decide
            built = build_checked(self.cfg, dataset.classes if conditional else None)
        fingerprint = dataset.fingerprint(with_labels=conditional)
        self.resolve_speed(resume)
        cfg = self.cfg
        if resume is not None:
            check_compatible(resume, cfg, fingerprint)
        for warning in (snr_finding(built).warning, guidance_warning(cfg)):  # validate's, said again at the start
            if warning:
                report.warn(warning)
        if self.world.is_main:
            (cfg.run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
            if resume is None and self.start.decisions():
                save_start(cfg.run_dir, self.start)
                self.wrote_start = True
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
        report.info(_plan_text(cfg, dataset, built, device, steps, resume))
        return _Prepared(cfg, dataset, built, resume, steps, fingerprint)

    def resolve_speed(self, resume: Checkpoint | None) -> None:
        """The config's ``auto`` speed modes made concrete: kept from the checkpoint when resuming (so resume stays
        exact), else measured (rank 0 measures; every rank takes its choice). An explicit mode measured to be much
        slower than another exact one is warned about; one that cannot run here is an error before anything."""
        cfg, device, report = self.cfg, self.device, self.report
        if cfg.train.compile is True:
            require_compile(device)
        warning = slow_mode_warning(cfg, device) if self.world.is_main else None
        if warning:
            report.warn(warning)
        if not is_auto(cfg.train):
            return
        if resume is not None:
            saved = resume.schema.config.get("train", {})
            kept = {
                key: saved.get(key, default)
                for key, default in (("precision", "fp32"), ("channels_last", False), ("compile", False))
            }
            self.cfg = _with_train(cfg, **{k: v for k, v in kept.items() if getattr(cfg.train, k) == AUTO})
            if self.cfg.train.compile is True:
                require_compile(device, kept=True)
            report.info(
                f"  speed modes kept from the run's start: {SpeedModes.for_run(self.cfg.train, device).describe()}"
            )
            self.start.speed = resume.start.speed
            return
        choice = None
        if self.world.is_main:
            with announced(report.info):
                choice = choose(cfg, device)
            report.info("  " + choice.reason())
        modes = self.world.from_main(choice.modes if choice is not None else None)
        self.cfg = _with_train(cfg, precision=modes.precision, channels_last=modes.channels_last, compile=modes.compile)
        self.start.speed = choice.record() if choice is not None else None

    def train(self, prepared: _Prepared) -> TrainResult | None:
        """The training loop with its progress, events and the interrupt and failure policies; None when a
        second interrupt stopped it at once."""
        cfg, resume, report, world = prepared.cfg, prepared.resume, self.report, self.world
        start_step = self.start_step = resume.step if resume else 0
        events = (
            EventDispatcher(RunInfo(cfg.run_dir, cfg, str(self.device), start_step, prepared.steps))
            if world.is_main
            else _Silent()
        )
        self.events = events
        started = time.perf_counter()
        reached = _Reached(start_step)

        def on_measured(images_per_s: float, eta_s: float) -> None:
            report.info(f"  measured {images_per_s:.1f} images/s: about {format_duration(eta_s)} of training left")
            if self.device.type == "cpu" and eta_s > CPU_WARN_SECONDS:
                report.warn(
                    f"this run needs about {format_duration(eta_s)} on this CPU; "
                    "configs/mnist-cpu.toml is sized for a CPU (about 15 minutes on 2 cores)"
                )

        events.emit("train_start")
        try:
            with report.training(prepared.steps, start_step) as show_step:

                def on_step(metrics: dict[str, Any]) -> None:
                    if not reached.announced:  # the first record of a start says what the start decided
                        metrics = {**metrics, **self.start.decisions()}
                        reached.announced = True
                    reached.step = metrics["step"]
                    events.emit("step_end", step=metrics["step"], metrics=metrics)
                    show_step(metrics)

                result = train(
                    cfg,
                    model=prepared.built.denoiser,
                    schedule=prepared.built.schedule,
                    dataset=prepared.dataset,
                    device=self.device,
                    run_dir=cfg.run_dir,
                    checkpoint_state={
                        **describe_run(
                            cfg, prepared.built, prepared.fingerprint, __version__, prepared.dataset.classes
                        ),
                        **self.start.decisions(),
                    },
                    resume=resume,
                    denoiser_component=prepared.built.refs["denoiser"],
                    world=world,
                    objective=prepared.built.objective,
                    events=TrainEvents(
                        on_step=on_step,
                        on_measured=on_measured,
                        replan=self._replan(start_step),
                        on_checkpoint=lambda path, step: events.emit("checkpoint_written", step=step, path=path),
                    ),
                )
        except BaseException as exc:
            try:  # let the plugins close their files; the original error is the one to report
                events.emit("train_end", step=reached.step, interrupted=True)
            except HookFailed:
                pass
            if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C, or SIGTERM outside the loop: stopped at once
                done = step_dirs(cfg.run_dir)
                why = "SIGTERM" if isinstance(exc, Terminated) else "a second interrupt"
                report.info(
                    f"stopped at once ({why}) near step {reached.step:,}; "
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

    def _replan(self, start_step: int) -> Replan | None:
        """The loop's one re-plan of a time budget from its own images/s (None without a budget, or where the plan
        is kept as it is); it replaces :attr:`plan`."""
        if self.plan is None:
            return None
        batch = self.cfg.train.batch_size
        at = self.plan.replan_step(batch, start_step, self.cfg.train.checkpoint_every)
        if at is None:
            return None

        def steps(step: int, images_per_s: float) -> tuple[int, dict[str, Any]]:
            made = self.plan
            before = start_step * batch / images_per_s if images_per_s > 0 else 0.0  # an earlier start's steps
            self.plan = made.replanned(step, images_per_s, time.perf_counter() - self.started + before, batch, self.cap)
            self.start.time_plan = self.plan.record()
            self.report.info(
                f"  re-planned at step {step:,} from the loop's own {self.plan.loop_images_per_s or 0:,.1f} images/s: "
                f"{self.plan.steps:,} steps (planned {made.steps:,})"
            )
            return self.plan.steps, {"time_plan": self.start.time_plan}

        return Replan(at, steps)

    def say_budget_used(self, result: TrainResult) -> None:
        """How much of the time budget this start trained for, at what rate against the plan's."""
        plan = self.plan
        assert plan is not None
        took = time.perf_counter() - self.started
        used = took + (self.guide_took or 0.0)
        rate = (result.step - self.start_step) * self.cfg.train.batch_size / took if took > 0 else 0.0
        self.report.info(
            f"time budget {format_duration(plan.budget_s)}: this start trained for {format_duration(used)} "
            f"({used / plan.budget_s:.0%} of the budget); the main network at {rate:,.1f} images/s, "
            f"planned at {plan.images_per_s:,.1f}"
            + (
                f", re-planned at step {plan.replanned_at:,} at {plan.loop_images_per_s or 0:,.1f}"
                if plan.replanned_at is not None
                else ""
            )
        )

    def write_samples(self, prepared: _Prepared, result: TrainResult) -> None:
        """One pass draws ``sample.num_images`` images, the first few of which also give the denoising strip."""
        report, events = self.report, self.events
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
            Components(
                built.schedule,
                result.ema_model if sc.use_ema else result.model,
                built.sampler,
                built.refs,
                built.objective,
            ),
            run_dir=run_dir,
            step=result.step,
            weights=weights,
            classes=prepared.dataset.classes,
        )
        labels = trained.labels(count) if trained.conditional else None
        started = time.perf_counter()
        with report.sampling(count * len(visited)) as advance:
            images, captured = trained.draw(
                count,
                seed=sc.seed,
                batch_size=sc.batch_size,
                progress=advance,
                capture_steps=shown or None,
                labels=labels,
            )
        if sc.num_images:
            shown_labels = labels[: sc.num_images] if labels is not None else None
            for name in ("samples.png", "samples.npz"):
                write_images(images[: sc.num_images], run_dir / name, labels=shown_labels, classes=trained.classes)
        if sc.trajectory_images and captured:
            write_trajectory({t: x[: sc.trajectory_images] for t, x in captured.items()}, run_dir / "trajectory.png")
        written = [run_dir / name for name in OUTPUT_FILES if (run_dir / name).exists()]
        events.emit("samples_written", paths=written)
        took = format_duration(time.perf_counter() - started)
        report.info(f"sampled in {took}; wrote " + ", ".join(map(str, written)))


@dataclass
class _Reached:
    """How far a start's loop got, as its progress callbacks saw it."""

    step: int
    announced: bool = False


def _kept_choice(kept: dict[str, Any], chosen_for: dict[str, Any]) -> ModelChoice | None:
    """The model choice the run's first start recorded, where it was made for this config's budget and models."""
    if any(kept.get(k) != v for k, v in chosen_for.items()):
        return None
    index, steps = kept.get("index"), kept.get("steps")
    if not isinstance(index, int) or not isinstance(steps, list) or not 0 <= index < len(steps):
        return None
    if index > len(chosen_for["smaller_models"]):
        return None
    return ModelChoice(index, steps, kept["min_steps"])


def _plan_text(
    cfg: RunConfig, dataset: Dataset, built: Components, device: torch.device, steps: int, resume: Checkpoint | None
) -> str:
    """What a start says before training: the data, the model, the speed modes and the steps."""
    model, tc = built.denoiser, cfg.train
    return (
        f"ddpmkit run {cfg.run_dir}: {dataset.description}, {len(dataset):,} images\n"
        f"  device {device}, {cfg.denoiser.name} {model.num_parameters():,} parameters predicting {model.prediction}, "
        f"{SpeedModes.for_run(tc, device).describe()}\n"
        f"  {steps_per_epoch(len(dataset), tc.batch_size):,} steps of batch {min(tc.batch_size, len(dataset))} "
        f"per epoch; {steps:,} steps in all ("
        + ("train.max_steps" if tc.max_steps is not None and steps == tc.max_steps else f"{tc.epochs:,} epochs")
        + (
            f", which end before train.max_steps = {tc.max_steps:,}: the first reached stops the run"
            if tc.max_steps is not None and steps < tc.max_steps and tc.time_budget is None
            else ""
        )
        + (" planned by the time budget" if tc.time_budget is not None else "")
        + ")"
        + (f"\n  resuming from {resume.path} (step {resume.step:,})" if resume is not None else "")
    )


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


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a name the file system refuses (too long) does not."""
    try:
        return path.exists()
    except OSError:
        return False


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


def _remove_outputs(run_dir: Path) -> None:
    """--fresh: the checkpoints, metrics and samples of an earlier run go."""
    shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)
    for name in (METRICS_FILE, *OUTPUT_FILES):
        (run_dir / name).unlink(missing_ok=True)


def _with_train(cfg: RunConfig, **settings: Any) -> RunConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=settings)})
