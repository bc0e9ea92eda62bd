"""The training loop (Ho et al. 2020, Algorithm 1), readable top to bottom.

Every random draw is a function of (run.seed, step): the data order of an epoch, each batch's
timesteps and noise, and dropout. A resumed run therefore continues exactly the streams an
uninterrupted run would have drawn, and on CPU ends with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.utils import ModelEmaV3

from ddpmkit.diffusion import NULL_CLASS, Cond
from ddpmkit.errors import DdpmkitError, HookFailed, TrainingDiverged
from ddpmkit.interfaces import Denoiser, NoiseSchedule, Objective
from ddpmkit.registry.blame import blame
from ddpmkit.run.checkpoint import TRACKED_FILE, Checkpoint, save_checkpoint, save_snapshot
from ddpmkit.run.components import build_objective
from ddpmkit.run.config import RunConfig
from ddpmkit.run.data import Dataset, to_model_scale
from ddpmkit.runtime.distributed import World, check_batch
from ddpmkit.runtime.processes import signals_handled
from ddpmkit.runtime.speed import (
    SpeedModes,
    autocast,
    grad_scaler,
    make_optimizer,
    maybe_compiled,
    memory_format,
    set_matmul_precision,
)
from ddpmkit.training.posthoc_ema import TrackedEmas

if TYPE_CHECKING:
    from ddpmkit.registry.discovery import Component

CPU_WARN_SECONDS = 2 * 3600
#: Steps not counted in throughput: the first ones pay one-off costs (kernel selection, allocator
#: growth, compilation), so a rate that includes them understates the steady state several times.
WARMUP_STEPS = 5
#: Steps timed after the warm-up before the first ETA is announced.
MEASURE_AFTER_STEPS = 10


def derive_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for random stream ``stream`` at ``index`` (epoch or step)."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the dataset used in ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as in the tutorial)."""
    return max(1, num_images // batch_size)


def learning_rate(cfg: RunConfig, step: int, decay_end: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or a cosine decay
    that reaches ``lr_min`` at ``decay_end`` and stays there.

    A function of the step alone, set before every update, so a resumed run follows the same schedule
    (and a changed ``train.lr`` takes effect on resume, instead of the optimizer state's old value).
    ``decay_end`` is the run's planned last step when it first started (recorded in its checkpoints): a run
    extended past it trains on at ``lr_min`` rather than jumping back to the peak.
    """
    tc = cfg.train
    if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
        return tc.lr * (step + 1) / tc.lr_warmup_steps
    if tc.lr_decay == "cosine":
        span = max(1, decay_end - tc.lr_warmup_steps)
        progress = min(1.0, (step - tc.lr_warmup_steps) / span)
        return tc.lr_min + (tc.lr - tc.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    return tc.lr


def lr_decay_end(cfg: RunConfig, resume: Checkpoint | None, last_step: int) -> int:
    """The step a cosine decay ends at: the plan of the run's first start (as its checkpoints record it), so
    that extending a run continues at ``lr_min`` instead of restarting the decay; else ``last_step``."""
    recorded = resume.start.lr_decay_end if resume is not None else None
    return recorded if recorded is not None else last_step  # checkpoints before 0.5 record none


def _divergence_advice(cfg: RunConfig, happened: str, step: int, last_good: Path | None, skipped: int = 0) -> str:
    """One line: what went non-finite (``happened``) where, that nothing bad was saved, and how to recover."""
    skip = f" after {skipped} skipped steps in a row" if skipped else ""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
    return (
        f"{happened} at step {step}{skip}; nothing from that step was saved and {kept}. Lower train.lr "
        f"(now {cfg.train.lr:g}) or set train.grad_clip, then run again with --fresh to start over "
        "(resuming keeps the weights of the last checkpoint, which a too-large learning rate may already have spoiled)"
    )


class RankStopped(DdpmkitError):
    """Another rank of a multi-process run failed; this one stopped with it."""


def total_steps(cfg: RunConfig, num_images: int) -> int:
    steps = cfg.train.epochs * steps_per_epoch(num_images, cfg.train.batch_size)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps is not None else steps


@dataclass(frozen=True)
class Replan:
    """Re-plan the last step once, at step ``at``, from the loop's own steady images/s: ``steps(step, images_per_s)``
    gives the new last step and the state to record with it in every later checkpoint (a resumed run keeps it).

    A time budget's plan is fixed before the loop from a few seconds of measurement, which missed the loop's
    own speed by -13 % (an AMX Xeon) to +25 % (an AVX2-only EPYC Zen 3); the loop's first minutes measure it."""

    at: int
    steps: Callable[[int, float], tuple[int, dict[str, Any]]]


@dataclass
class TrainEvents:
    """Callbacks the loop calls; the runner connects them to progress display, metrics and hooks."""

    on_step: Callable[[dict[str, Any]], None] = lambda metrics: None
    on_checkpoint: Callable[[Path, int], None] = lambda path, step: None
    on_measured: Callable[[float, float], None] = lambda images_per_s, eta_s: None
    replan: Replan | None = None


@dataclass
class TrainResult:
    model: Denoiser
    ema_model: Denoiser
    step: int
    interrupted: bool
    last_checkpoint: Path | None = None
    #: an event hook that failed: training stopped after a checkpoint (the runner reports it)
    failure: HookFailed | None = None


class StopRequest:
    """Set by SIGINT/SIGTERM: the loop finishes the current step, checkpoints and returns.

    A second Ctrl-C gives up at once; a repeated SIGTERM asks nothing new and is ignored. Linux sends a
    parent-death signal (PR_SET_PDEATHSIG) at each re-parenting, and the children of a killed torchrun
    are re-parented once per thread of it as those threads exit, often a step apart.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous: dict[int, Any] = {}

        def handler(signum, frame):
            if self.signal is None:
                self.signal = signum
            elif signum == signal.SIGINT:  # a second Ctrl-C: give up at once
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt

        with signals_handled(handler, (signal.SIGINT, signal.SIGTERM)) as before:
            previous.update(before or {})
            yield self


class _Throughput:
    """Images per second from the steady state: the first WARMUP_STEPS steps (set-up, compilation) are not counted."""

    def __init__(self, batch: int, first_step: int) -> None:
        self.batch, self.first_step = batch, first_step
        self.started = time.perf_counter()
        self.steady_from: tuple[float, int] | None = None  # (time, step) at the end of the warm-up

    def tick(self, step: int) -> tuple[float, float]:
        """(images/s so far, seconds since the start), after ``step``."""
        now = time.perf_counter()
        done = step - self.first_step
        if done == WARMUP_STEPS:
            self.steady_from = (now, step)
        if self.steady_from is not None and step > self.steady_from[1]:
            rate = (step - self.steady_from[1]) * self.batch / (now - self.steady_from[0])
        else:
            rate = done * self.batch / (now - self.started) if now > self.started else 0.0
        return rate, now - self.started

    def first_estimate_due(self, step: int) -> bool:
        """Whether the first ETA is announced after ``step`` (once the warm-up and a few timed steps are done)."""
        return step - self.first_step == WARMUP_STEPS + MEASURE_AFTER_STEPS


def training_loss(
    objective: Objective,
    model: torch.nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond: Cond | None = None,
) -> torch.Tensor:
    """One batch's loss under the run's objective (a named step: tests wrap it to inject failures)."""
    return objective.training_loss(model, x0, t, noise, cond)


@dataclass
class _Update:
    """What one optimizer step did: the loss (the mean over ranks), whether it was skipped as non-finite."""

    loss: float
    bad: bool
    grad_norm: float | None


class _Trainer:
    """The state of a training run (model, optimizer, loss scaler, EMA, step) and its named steps."""

    def __init__(
        self,
        cfg: RunConfig,
        model: Denoiser,
        schedule: NoiseSchedule,
        device: torch.device,
        world: World,
        resume: Checkpoint | None,
        denoiser_component: Component | None,
        objective: Objective | None = None,
    ) -> None:
        self.cfg, self.tc, self.world, self.device = cfg, cfg.train, world, device
        self.modes = SpeedModes.for_run(self.tc, device)
        set_matmul_precision(device, self.modes)
        self.model = model.to(device, memory_format=memory_format(self.modes.channels_last))
        self.schedule = schedule.to(device)
        self.objective = objective if objective is not None else build_objective(cfg, self.schedule, model.prediction)
        self.optimizer = make_optimizer(model.parameters(), self.tc.lr, self.modes)
        self.scaler = grad_scaler(device, self.modes)
        self.ema = ModelEmaV3(model, decay=self.tc.ema_decay, use_warmup=self.tc.ema_warmup)
        posthoc = self.tc.posthoc_ema
        self.tracked = TrackedEmas(self.model, posthoc.sigma_rels) if posthoc.enabled else None
        self.step = 0
        self.skipped_in_a_row = 0
        self.last_good: Path | None = resume.path if resume is not None else None
        self.component = denoiser_component
        if resume is not None:
            self.restore(resume)
        wrapped = None
        if world.enabled:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        # CUDA graphs capture one process's step; DistributedDataParallel's gradient hooks stay eager
        self.graphs = self.modes.graphed and not world.enabled
        self.forward = maybe_compiled(model, self.modes, wrapped, graphs=self.graphs)

    def restore(self, resume: Checkpoint) -> None:
        self.model.load_state_dict(resume.weights("model"))
        self.ema.module.load_state_dict(resume.weights("ema"))
        self.optimizer.load_state_dict(resume.optimizer_state())
        if self.scaler is not None and resume.schema.grad_scaler:
            self.scaler.load_state_dict(resume.schema.grad_scaler)
        if self.tracked is not None:
            self.tracked.load_state_dict(resume.weights(TRACKED_FILE))
        self.step = resume.step

    def track(self, run_dir: Path, last_step: int) -> None:
        """Average this step's weights into the post-hoc EMA profiles (a skipped step's too: its weights are the
        previous ones), and store their snapshot every ``snapshot_every`` steps and at the last (rank 0)."""
        if self.tracked is None:
            return
        self.tracked.update(self.model, self.step)
        if self.world.is_main and (self.step % self.tc.snapshot_every == 0 or self.step == last_step):
            profiles = {s: self.tracked.weights(self.model, s) for s in self.tracked.sigma_rels}
            save_snapshot(run_dir, self.step, profiles, self.tracked.gammas)

    def batch_noise(self, batch: int, shape: tuple[int, ...], mine: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's timesteps and noise (every rank draws the whole batch's and takes its slice), and the
        global RNG seeded for this step's dropout."""
        seed, step = self.cfg.run.seed, self.step
        g = torch.Generator(self.device).manual_seed(derive_seed(seed, "noise", step))
        t, noise = self.objective.draw_training(batch, shape, g)
        torch.manual_seed(derive_seed(seed, f"dropout:{self.world.rank}" if self.world.enabled else "dropout", step))
        return t[mine], noise[mine]

    def batch_labels(self, labels: torch.Tensor, mine: slice) -> torch.Tensor:
        """This step's class labels with classifier-free dropout: each of the global batch's labels replaced by
        NULL_CLASS with probability ``conditioning.label_dropout``, from a stream of its own (seed, step)."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "labels", self.step))
        dropped = (torch.rand(len(labels), generator=g) < self.cfg.conditioning.label_dropout).to(labels.device)
        return torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)[mine]

    def batch_flips(self, x0: torch.Tensor, batch: int, mine: slice) -> torch.Tensor:
        """``x0`` with each of the global batch's images flipped left-right with probability 1/2 (data.hflip),
        from a stream of its own (seed, step)."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "flips", self.step))
        flip = (torch.rand(batch, generator=g) < 0.5)[mine].to(x0.device).view(-1, 1, 1, 1)
        return torch.where(flip, x0.flip(-1), x0)

    def update(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, lr: float, cond: Cond | None = None
    ) -> _Update:
        """Forward, backward and (unless the loss or gradients are non-finite on any rank) the optimizer step
        and the EMA update."""
        tc, scaler = self.tc, self.scaler
        guard = blame(self.component, "in training") if self.component else nullcontext()
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        with guard, autocast(self.device, self.modes.precision):
            loss = training_loss(self.objective, self.forward, x0, t, noise, cond)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        # the gradient norm (clipped to grad_clip when set; inf leaves the gradients as they are)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or math.inf)
        # the step's one wait for the device: both figures in a single copy
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.detach().float()]).tolist()
        # Non-finite loss or gradients are caught before the update, so no bad step reaches the
        # weights. (fp16's overflowing gradients are the loss scaler's: it skips those steps itself.)
        bad = not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value))
        # the mean loss over ranks; a bad step on any rank is bad on all (one process: as they are)
        loss_sum, bad_any = self.world.all_reduce([loss_value, float(bad)])
        loss_value, bad = loss_sum / self.world.size, bad_any > 0
        if bad:
            self._skip(loss_value)
            return _Update(loss_value, True, None)
        self.skipped_in_a_row = 0
        if scaler is not None:
            scaler.step(self.optimizer)  # skipped, and the scale lowered, when a gradient overflowed
            scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.model, step=self.step + 1 if tc.ema_warmup else None)
        return _Update(loss_value, False, norm_value if tc.grad_clip is not None else None)

    def _skip(self, loss_value: float) -> None:
        """The non-finite policy: halt, or skip up to ``train.max_nonfinite_skips`` steps in a row."""
        self.skipped_in_a_row += 1
        if self.tc.nonfinite == "halt" or self.skipped_in_a_row > self.tc.max_nonfinite_skips:
            happened = (
                f"the loss became {loss_value}"
                if not math.isfinite(loss_value)
                else "the loss or gradients became non-finite"
            )
            raise TrainingDiverged(
                _divergence_advice(self.cfg, happened, self.step + 1, self.last_good, self.skipped_in_a_row - 1)
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # closes the step it unscaled (and lowers the scale)

    def save(self, run_dir: Path, checkpoint_state: dict[str, Any], per_epoch: int) -> Path | None:
        """A checkpoint of this step (rank 0 only); never one with non-finite weights."""
        if not self.world.is_main:
            return None
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            # finite gradients can still overflow the weights (a huge learning rate): never save those
            raise TrainingDiverged(
                _divergence_advice(self.cfg, "the weights became non-finite", self.step, self.last_good)
            )
        state = {**checkpoint_state, "step": self.step, "epoch": self.step / per_epoch}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        path = save_checkpoint(
            run_dir,
            self.step,
            model_state=self.model.state_dict(),
            ema_state=self.ema.module.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            state=state,
            keep=self.tc.keep_checkpoints,
            extra={TRACKED_FILE: self.tracked.state_dict()} if self.tracked is not None else None,
        )
        self.last_good = path
        return path


def _replanned(world: World, replan: Replan, step: int, rate: float) -> tuple[int, dict[str, Any]]:
    """Rank 0's new last step (at least ``step``) and the state it records; every rank takes the steps."""
    steps, recorded = replan.steps(step, rate)
    return world.from_main(max(step, steps)), recorded


def _agree(world: World, stop: bool, error: BaseException | None) -> bool:
    """Every rank stops at the same step, whichever rank had the reason (one process: as it is). Raises the
    local error, or RankStopped when another rank failed; returns whether to stop."""
    stop_any, error_any = world.all_reduce([float(stop), float(error is not None)], op="max")
    if error is not None:
        raise error
    if error_any:
        raise RankStopped("another training process failed (its error is above); this one stopped too")
    return stop_any > 0


def train(
    cfg: RunConfig,
    *,
    model: Denoiser,
    schedule: NoiseSchedule,
    dataset: Dataset,
    device: torch.device,
    run_dir: Path,
    checkpoint_state: dict[str, Any],
    resume: Checkpoint | None = None,
    events: TrainEvents | None = None,
    denoiser_component: Component | None = None,
    world: World | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` as ``cfg.train`` says, checkpointing into ``run_dir``.

    ``objective`` is the run's (:attr:`~ddpmkit.run.components.Components.objective`; built from ``cfg`` for the
    ``schedule`` when not given). An exception in the forward pass or the loss is reported naming
    ``denoiser_component``. With a multi-process ``world`` (torchrun) the model trains under
    DistributedDataParallel and only rank 0 writes (see ``ddpmkit.runtime.distributed``).
    """
    world = world or World()
    events = events or TrainEvents()
    trainer = _Trainer(cfg, model, schedule, device, world, resume, denoiser_component, objective)
    images = dataset.images.to(device)
    labels = dataset.labels.to(device) if cfg.conditioning.enabled else None
    n = len(dataset)
    per_epoch = steps_per_epoch(n, cfg.train.batch_size)
    batch = min(cfg.train.batch_size, n)
    share = check_batch(world, batch)  # this rank's slice of the global batch
    mine = slice(world.rank * share, (world.rank + 1) * share)
    last_step = total_steps(cfg, n)
    decay_end = lr_decay_end(cfg, resume, last_step)
    checkpoint_state = {**checkpoint_state, "lr_decay_end": decay_end}

    result = TrainResult(model, trainer.ema.module, trainer.step, interrupted=False)
    order, order_epoch = None, -1
    model.train()
    meter = _Throughput(batch, trainer.step)
    stop = StopRequest()
    failure: HookFailed | None = None
    stopping = False
    with stop.installed():
        while trainer.step < last_step and not stopping:
            epoch, index = divmod(trainer.step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(cfg.run.seed, epoch, n).to(device), epoch
            picked = order[index * batch : (index + 1) * batch]
            x0 = to_model_scale(images[picked[mine]])
            if cfg.data.hflip:
                x0 = trainer.batch_flips(x0, len(picked), mine)
            t, noise = trainer.batch_noise(batch, tuple(x0.shape[1:]), mine)
            noise = trainer.objective.couple(x0, noise)  # the objective may pair noise with images (OT flow matching)
            cond = {"class": trainer.batch_labels(labels[picked], mine)} if labels is not None else None
            lr = learning_rate(cfg, trainer.step, decay_end)
            done = trainer.update(x0, t, noise, lr, cond)
            trainer.step += 1
            step = trainer.step

            rate, elapsed = meter.tick(step)
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": done.loss,
                "lr": lr,
                "images_per_s": rate,
                "time": time.time(),
                "elapsed_s": elapsed,
            }
            if events.replan is not None and step == events.replan.at:
                last_step, recorded = _replanned(world, events.replan, step, rate)
                decay_end = last_step  # the cosine decay is laid over the new plan from here on
                checkpoint_state.update(recorded, lr_decay_end=decay_end)
                metrics.update(recorded, planned_steps=last_step)
            if done.bad:
                metrics["skipped"] = True
            elif done.grad_norm is not None:
                metrics["grad_norm"] = done.grad_norm
            error: BaseException | None = None
            try:
                trainer.track(run_dir, last_step)  # before the checkpoint: none exists without its snapshots
                events.on_step(metrics)
                if meter.first_estimate_due(step):
                    events.on_measured(rate, (last_step - step) * batch / rate if rate else float("inf"))
                if step % cfg.train.checkpoint_every == 0 or step == last_step:
                    path = trainer.save(run_dir, checkpoint_state, per_epoch)
                    if path is not None:
                        result.last_checkpoint = path
                        events.on_checkpoint(path, step)
            except HookFailed as exc:  # a plugin's bug must not cost training progress
                failure = exc
            except Exception as exc:  # raised below, once every rank knows
                error = exc
            stopping = _agree(world, stop.signal is not None or failure is not None or world.launcher_gone(), error)

        result.step = trainer.step
        if stopping:  # still under the handler: a signal that follows the first must not cut the save short
            result.interrupted = True
            if result.last_checkpoint is None or result.last_checkpoint.name != f"step-{trainer.step:08d}":
                path = trainer.save(run_dir, checkpoint_state, per_epoch)
                if path is not None:
                    result.last_checkpoint = path
                    if failure is None:
                        events.on_checkpoint(path, trainer.step)
    if failure is not None:
        result.failure = HookFailed(
            f"{failure}; training stopped at step {trainer.step}, checkpoint {result.last_checkpoint}"
        )
        result.failure.__cause__ = failure
    return result
