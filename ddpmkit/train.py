"""The training loop (Ho et al. 2020, Algorithm 1), readable top to bottom.

Every random draw is a function of (run.seed, step): the data order of an epoch, each batch's
timesteps and noise, and dropout. A resumed run therefore continues exactly the streams an
uninterrupted run would have drawn, and on CPU ends with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from timm.utils import ModelEmaV3

from .blame import blame
from .checkpoint import Checkpoint, save_checkpoint
from .config import RunConfig
from .data import Dataset, to_model_scale
from .speed import SpeedModes, autocast, grad_scaler, make_optimizer, maybe_compiled, memory_format, set_matmul_precision
from .diffusion import draw_training_batch_noise, training_loss
from .distributed import World, check_batch
from .errors import DdpmkitError, HookFailed, TrainingDiverged
from .interfaces import Denoiser, NoiseSchedule

if TYPE_CHECKING:
    from .plugins import Component

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


def learning_rate(cfg: RunConfig, step: int, last_step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine decay.

    A function of the step alone, set before every update, so a resumed run follows the same schedule
    (and a changed ``train.lr`` takes effect on resume, instead of the optimizer state's old value).
    """
    tc = cfg.train
    if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
        return tc.lr * (step + 1) / tc.lr_warmup_steps
    if tc.lr_decay == "cosine":
        span = max(1, last_step - tc.lr_warmup_steps)
        progress = min(1.0, (step - tc.lr_warmup_steps) / span)
        return tc.lr_min + (tc.lr - tc.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    return tc.lr


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


@dataclass
class TrainEvents:
    """Callbacks the loop calls; the runner connects them to progress display, metrics and hooks."""

    on_step: Callable[[dict[str, Any]], None] = lambda metrics: None
    on_checkpoint: Callable[[Path, int], None] = lambda path, step: None
    on_measured: Callable[[float, float], None] = lambda images_per_s, eta_s: None


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
    """Set by SIGINT/SIGTERM: the loop finishes the current step, checkpoints and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal is not None:  # a second Ctrl-C: give up at once
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt
            self.signal = signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


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
    denoiser_component: "Component | None" = None,
    world: World | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` as ``cfg.train`` says, checkpointing into ``run_dir``.

    An exception in the forward pass or the loss is reported naming ``denoiser_component``. With a
    multi-process ``world`` (torchrun) the model trains under DistributedDataParallel and only rank 0
    writes (see ``ddpmkit.distributed``).
    """
    world = world or World()
    events = events or TrainEvents()
    tc = cfg.train
    seed = cfg.run.seed
    T = schedule.num_timesteps

    # --- state: model, optimizer, EMA (restored from the checkpoint when resuming) -------------
    modes = SpeedModes.for_run(tc, device)
    set_matmul_precision(device, modes)
    model.to(device, memory_format=memory_format(modes.channels_last))
    schedule.to(device)
    optimizer = make_optimizer(model.parameters(), tc.lr, modes)
    scaler = grad_scaler(device, modes)
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=tc.ema_warmup)
    step = 0
    if resume is not None:
        model.load_state_dict(resume.weights("model"))
        ema.module.load_state_dict(resume.weights("ema"))
        optimizer.load_state_dict(resume.optimizer_state())
        if scaler is not None and resume.schema.grad_scaler:
            scaler.load_state_dict(resume.schema.grad_scaler)
        step = resume.step
    wrapped = None
    if world.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    forward = maybe_compiled(model, modes, wrapped)

    images = dataset.images.to(device)
    n = len(dataset)
    per_epoch = steps_per_epoch(n, tc.batch_size)
    batch = min(tc.batch_size, n)
    share = check_batch(world, batch)  # this rank's slice of the global batch
    mine = slice(world.rank * share, (world.rank + 1) * share)
    last_step = total_steps(cfg, n)

    def checkpoint(at_step: int, announce: bool = True) -> Path | None:
        if not world.is_main:
            return None
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # finite gradients can still overflow the weights (a huge learning rate): never save those
            raise TrainingDiverged(_divergence_advice(cfg, "the weights became non-finite", at_step,
                                                      result.last_checkpoint or resume_path))
        state = {**checkpoint_state, "step": at_step, "epoch": at_step / per_epoch}
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        path = save_checkpoint(
            run_dir,
            at_step,
            model_state=model.state_dict(),
            ema_state=ema.module.state_dict(),
            optimizer_state=optimizer.state_dict(),
            state=state,
            keep=tc.keep_checkpoints,
        )
        if announce:
            events.on_checkpoint(path, at_step)
        return path

    # --- the loop ---------------------------------------------------------------------------------
    result = TrainResult(model, ema.module, step, interrupted=False)
    order, order_epoch = None, -1
    model.train()
    started, started_step = time.perf_counter(), step
    measured_from: tuple[float, int] | None = None  # (time, step) at the end of the warm-up
    skipped_in_a_row = 0
    resume_path = resume.path if resume is not None else None
    stop = StopRequest()
    failure: HookFailed | None = None
    stopping = False
    with stop.installed():
        while step < last_step and not stopping:
            epoch, index = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(seed, epoch, n).to(device), epoch
            x0 = to_model_scale(images[order[index * batch : (index + 1) * batch][mine]])

            g = torch.Generator(device).manual_seed(derive_seed(seed, "noise", step))
            t, noise = draw_training_batch_noise(batch, tuple(x0.shape[1:]), T, g)
            t, noise = t[mine], noise[mine]  # every rank draws the whole batch's and takes its slice
            # dropout draws from the global RNG
            torch.manual_seed(derive_seed(seed, f"dropout:{world.rank}" if world.enabled else "dropout", step))

            guard = blame(denoiser_component, "in training") if denoiser_component else nullcontext()
            with guard, autocast(device, modes.precision):
                loss = training_loss(forward, schedule, x0, t, noise, weighting=tc.loss_weighting, gamma=tc.min_snr_gamma)
            lr = learning_rate(cfg, step, last_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            else:
                loss.backward()
            # the gradient norm (clipped to grad_clip when set; inf leaves the gradients as they are)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            loss_value = float(loss.detach())
            # Non-finite loss or gradients are caught before the update, so no bad step reaches the
            # weights. (fp16's overflowing gradients are the loss scaler's: it skips those steps itself.)
            bad = not math.isfinite(loss_value) or (scaler is None and not bool(torch.isfinite(norm)))
            # the mean loss over ranks; a bad step on any rank is bad on all (one process: as they are)
            loss_sum, bad_any = world.all_reduce([loss_value, float(bad)])
            loss_value, bad = loss_sum / world.size, bad_any > 0
            if bad:
                skipped_in_a_row += 1
                if tc.nonfinite == "halt" or skipped_in_a_row > tc.max_nonfinite_skips:
                    happened = (f"the loss became {loss_value}" if not math.isfinite(loss_value)
                                else "the loss or gradients became non-finite")
                    raise TrainingDiverged(_divergence_advice(cfg, happened, step + 1, result.last_checkpoint or resume_path,
                                                              skipped_in_a_row - 1))
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()  # closes the step it unscaled (and lowers the scale)
            else:
                skipped_in_a_row = 0
                grad_norm = float(norm) if tc.grad_clip is not None else None
                if scaler is not None:
                    scaler.step(optimizer)  # skipped, and the scale lowered, when a gradient overflowed
                    scaler.update()
                else:
                    optimizer.step()
                ema.update(model, step=step + 1 if tc.ema_warmup else None)
            step += 1

            now = time.perf_counter()
            done = step - started_step
            if done == WARMUP_STEPS:
                measured_from = (now, step)
            if measured_from is not None and step > measured_from[1]:  # the steady state, after the warm-up
                rate = (step - measured_from[1]) * batch / (now - measured_from[0])
            else:
                rate = done * batch / (now - started) if now > started else 0.0
            metrics = {
                "step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "images_per_s": rate,
                "time": time.time(), "elapsed_s": now - started,
            }
            if bad:
                metrics["skipped"] = True
            elif grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            error: BaseException | None = None
            try:
                events.on_step(metrics)
                if done == WARMUP_STEPS + MEASURE_AFTER_STEPS:
                    events.on_measured(rate, (last_step - step) * batch / rate if rate else float("inf"))
                if step % tc.checkpoint_every == 0 or step == last_step:
                    result.last_checkpoint = checkpoint(step) or result.last_checkpoint
            except HookFailed as exc:  # a plugin's bug must not cost training progress
                failure = exc
            except Exception as exc:  # raised below, once every rank knows
                error = exc
            # every rank stops at the same step, whichever rank had the reason (one process: as they are)
            local_stop = stop.signal is not None or failure is not None
            stop_any, error_any = world.all_reduce([float(local_stop), float(error is not None)], op="max")
            if error is not None:
                raise error
            if error_any:
                raise RankStopped("another training process failed (its error is above); this one stopped too")
            stopping = stop_any > 0

    result.step = step
    if stopping:
        result.interrupted = True
        if result.last_checkpoint is None or result.last_checkpoint.name != f"step-{step:08d}":
            result.last_checkpoint = checkpoint(step, announce=failure is None) or result.last_checkpoint
    if failure is not None:
        result.failure = HookFailed(f"{failure}; training stopped at step {step}, checkpoint {result.last_checkpoint}")
        result.failure.__cause__ = failure
    return result
