"""The pre-flight report of ``ddpmkit validate``: what a config builds, what the run will do, measured, and what
looks wrong before it starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ddpmkit.diffusion import MAX_FINAL_SNR
from ddpmkit.errors import DataNotFound
from ddpmkit.run.components import Components
from ddpmkit.run.config import RunConfig
from ddpmkit.runtime.units import format_bytes, format_duration

if TYPE_CHECKING:
    from ddpmkit.training.autotune import Timer

#: An EMA that still holds more than this share of the initial (random) weights at the end is flagged.
MAX_EMA_INITIAL_SHARE = 0.05
#: timm's ModelEmaV3 warm-up: decay_k = 1 - (1 + k / gamma) ** -power, capped at ema_decay.
EMA_WARMUP_GAMMA, EMA_WARMUP_POWER = 1.0, 2 / 3


@dataclass
class Finding:
    """One line of the report; ``warning`` says what to change when something looks wrong."""

    label: str
    text: str
    warning: str | None = None


def ema_schedule(decay: float, warmup: bool, steps: int) -> tuple[float, float]:
    """(share of the initial weights left in the EMA after ``steps`` updates, decay at the last update),
    as ddpmkit's training loop updates timm's ModelEmaV3 (with warm-up: decay 0 at the first update)."""
    if not warmup:
        return decay**steps, decay
    if steps == 0:
        return 1.0, decay
    # the first update has decay 0 and so replaces the initial weights entirely; the decay of the last
    # update (k = steps - 1) is the warm-up formula's, capped at ``decay``
    k = steps - 1
    return 0.0, 0.0 if k == 0 else min(decay, 1 - (1 + k / EMA_WARMUP_GAMMA) ** -EMA_WARMUP_POWER)


def ema_finding(cfg: RunConfig, steps: int) -> Finding:
    tc = cfg.train
    share, last = ema_schedule(tc.ema_decay, tc.ema_warmup, steps)
    horizon = 1 / (1 - last) if last < 1 else float("inf")
    text = (
        f"decay {tc.ema_decay:g}{' with warm-up' if tc.ema_warmup else ''}: horizon about {horizon:,.0f} steps "
        f"at the end of {steps:,} steps; {share:.1%} of the initial weights left in the EMA"
    )
    warning = None
    if share > MAX_EMA_INITIAL_SHARE:
        warning = (
            f"the EMA weights (used for sampling) would still be {share:.0%} random initialisation: "
            "set train.ema_warmup = true, a smaller train.ema_decay, or train longer"
        )
    return Finding("EMA", text, warning)


def guidance_warning(cfg: RunConfig) -> str | None:
    """Classifier-free guidance mixes in the unconditional model, which ``label_dropout = 0`` never trains."""
    if cfg.guidance.enabled and cfg.guidance_method == "classifier-free" and cfg.conditioning.label_dropout == 0:
        return (
            f"guidance.weight = {cfg.guidance.weight:g} guides classifier-free by the unconditional model, which "
            "conditioning.label_dropout = 0 never trains: set label_dropout (0.1 is usual) or guidance.weight = 1"
        )
    return None


def snr_finding(built: Components) -> Finding:
    snr = float(built.schedule.snr()[-1])
    warning = None
    if snr >= MAX_FINAL_SNR:
        warning = (
            f"x_T still holds signal (SNR {snr:.3g} >= {MAX_FINAL_SNR}): sampling starts from pure noise, "
            "which the model never saw at t = T-1; raise beta_end or num_timesteps"
        )
    return Finding(
        "schedule",
        f"terminal signal-to-noise ratio {snr:.3g} (abar_T = {float(built.schedule.alphas_cumprod[-1]):.3g})",
        warning,
    )


def data_finding(cfg: RunConfig) -> tuple[Finding, int | None]:
    """The dataset's size and the range of values the model will see; (finding, number of images or None)."""
    from ddpmkit.run.data import load_dataset, resolve_root, to_model_scale

    section = cfg.data.model_copy(update={"download": False})
    try:
        ds = load_dataset(section, seed=cfg.run.seed)
    except DataNotFound as exc:  # anything else (a missing folder, a damaged file) stops validate
        if cfg.data.download:  # said as the config has it: the run downloads what validate does not
            title = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR-10"}.get(cfg.data.dataset)
            text = f"not checked: {title or cfg.data.dataset} not found under {resolve_root(cfg.data)}"
            return Finding("data", text + "; `ddpmkit run` downloads it (data.download), validate never does"), None
        return Finding("data", f"not checked: {exc} (validate never downloads)"), None
    lo, hi = (float(to_model_scale(v)) for v in (ds.images.min(), ds.images.max()))
    warning = None
    if hi - lo < 1.0:
        warning = f"the images span only [{lo:.2f}, {hi:.2f}] of the model's [-1, 1]: check the data"
    return Finding("data", f"{len(ds):,} images, values in [{lo:.2f}, {hi:.2f}]", warning), len(ds)


#: Bytes per tensor beyond its data (measured with torch 2.14: a safetensors header entry is about 90, an Adam
#: entry of optimizer.pt about 800) and per folder (state.json), rounded up.
SAFETENSORS_PER_TENSOR, OPTIMIZER_PER_TENSOR, STATE_JSON = 128, 1024, 8192


def disk_estimate(cfg: RunConfig, built: Components, steps: int) -> tuple[int, str]:
    """(bytes, what they are) a run of ``steps`` leaves on disk at most: ``keep_checkpoints`` checkpoints (the
    weights, the EMA, Adam's two moments and any tracked post-hoc EMAs) and every post-hoc EMA snapshot."""
    state = built.denoiser.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    one = weights + SAFETENSORS_PER_TENSOR * len(state)  # one safetensors file of the weights
    tc = cfg.train
    profiles = len(tc.posthoc_ema.sigma_rels) if tc.posthoc_ema.enabled else 0
    checkpoint = (2 + profiles) * one + 2 * weights + OPTIMIZER_PER_TENSOR * len(state) + STATE_JSON
    text = f"{tc.keep_checkpoints} checkpoints of {format_bytes(checkpoint)}"
    if not profiles:
        return tc.keep_checkpoints * checkpoint, text
    snapshots = steps // tc.snapshot_every + (1 if steps % tc.snapshot_every else 0)
    snapshot = profiles * one + STATE_JSON
    return (
        tc.keep_checkpoints * checkpoint + snapshots * snapshot,
        text + f" and {snapshots:,} post-hoc EMA snapshots of {format_bytes(snapshot)}",
    )


def disk_finding(cfg: RunConfig, built: Components, steps: int) -> Finding:
    import shutil

    total, what = disk_estimate(cfg, built, steps)
    folder = cfg.run_dir.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    warning = None
    if total > free:
        warning = (
            f"the run needs about {format_bytes(total)} but {folder} has {format_bytes(free)} free: free "
            "space, lower train.keep_checkpoints"
            + (" or raise train.posthoc_ema.every" if cfg.train.posthoc_ema.enabled else "")
        )
    return Finding(
        "disk", f"at most about {format_bytes(total)} in {cfg.run_dir}: {what} ({format_bytes(free)} free)", warning
    )


def time_finding(
    cfg: RunConfig,
    built: Components,
    steps: int,
    device: torch.device,
    *,
    label: str = "time",
    what: str = "of training",
    timer: Timer | None = None,
) -> Finding:
    """The training time, from images/s measured at the run's own batch in the speed mode that will run
    (``auto`` resolved as the run will resolve it, and cached for it)."""
    from ddpmkit.training.autotune import MEASURE_STEPS, measured_rate

    modes, ips = measured_rate(cfg, device, timer=timer)
    total = cfg.train.batch_size * steps / ips
    return Finding(
        label,
        f"about {format_duration(total)} {what} on {device} in {modes.describe()}: {ips:,.1f} "
        f"images/s measured at the run's batch of {cfg.train.batch_size} (the median of up to "
        f"{MEASURE_STEPS} steps; a busy machine can take up to twice as long)",
    )


def speed_finding(cfg: RunConfig, device: torch.device, *, timer: Timer | None = None) -> Finding | None:
    """The warning for a mode the config names that is measured several times slower than fp32 here (bf16 on a
    CPU that emulates it); None when there is none. Measured before anything else, so it is said first."""
    from ddpmkit.training.autotune import slow_mode_warning

    warning = slow_mode_warning(cfg, device, timer=timer)
    return Finding("speed", "train.precision = bf16 is emulated on this CPU", warning) if warning else None


def preflight(cfg: RunConfig, built: Components, *, timing: bool = True) -> list[Finding]:
    """The report: data, planned steps, EMA horizon, terminal SNR and (with ``timing``) the training time."""
    from ddpmkit.runtime.device import pick_device
    from ddpmkit.training.loop import total_steps

    data, num_images = data_finding(cfg)
    findings = [data]
    guided = cfg
    speed = speed_finding(cfg, pick_device(cfg.run.device)) if timing else None
    findings += [speed] if speed else []
    if cfg.train.time_budget is not None and timing:  # the steps the run will plan (it measures the same way)
        from ddpmkit.run.components import build_components
        from ddpmkit.training.budget import choose_model, plan, with_steps

        if cfg.train.smaller_models:  # the model the run would choose, measured as it measures
            choice = choose_model(cfg, pick_device(cfg.run.device))
            findings.append(Finding("model", choice.describe(cfg)))
            if choice.index:
                cfg = cfg.with_smaller_model(choice.index)
                built = build_components(cfg)
        budget = plan(cfg, pick_device(cfg.run.device))
        guided = cfg  # the guide trains its steps before the plan caps the main network's (see runner)
        cfg = with_steps(cfg, budget.steps)
        findings.append(Finding("budget", budget.describe()))
    if warning := guidance_warning(cfg):
        findings.append(Finding("guidance", "classifier-free, without an unconditional model", warning))
    if num_images is None:
        return findings + [snr_finding(built)]
    steps = total_steps(cfg, num_images)
    findings += [ema_finding(cfg, steps), snr_finding(built), disk_finding(cfg, built, steps)]
    if timing and steps:
        device = pick_device(cfg.run.device)
        findings.append(time_finding(cfg, built, steps, device))
        if cfg.trains_guide:  # the guide trains first: its time adds to the main network's
            from ddpmkit.run.guide import build_guide

            guide, guide_built = build_guide(guided)
            findings.append(
                time_finding(
                    guide,
                    guide_built,
                    total_steps(guide, num_images),
                    device,
                    label="guide",
                    what="of training first (autoguidance)",
                )
            )
    return findings


def describe_config(cfg: RunConfig, built: Components) -> str:
    """A few lines naming the data, schedule, denoiser (with its parameter count), sampler and training plan."""
    params = built.denoiser.num_parameters()
    c, h, w = cfg.image_shape
    t = cfg.train
    refs = built.refs
    lines = [
        f"run        {cfg.run_dir}  (seed {cfg.run.seed}, device {cfg.run.device})",
        f"data       {cfg.data.dataset}, {c}x{h}x{w}",
        f"schedule   {refs['schedule'].qualified}, T = {cfg.num_timesteps}",
        f"denoiser   {refs['denoiser'].qualified}, {params:,} parameters ({params / 1e6:.1f} M), "
        f"predicts {built.denoiser.prediction}",
        f"sampler    {refs['sampler'].qualified}, {_cost(built)}, {cfg.sampler.options}",
        f"train      {t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}, EMA {t.ema_decay:g}"
        f"{' with warm-up' if t.ema_warmup else ''}, "
        f"{t.precision} precision, channels-last {t.channels_last}, compile {t.compile}"
        + (" (in CUDA graphs on a GPU)" if t.cuda_graphs else "")
        + (f", at most {t.max_steps} steps" if t.max_steps is not None else "")
        + (f", a time budget of {format_duration(t.time_budget)}" if t.time_budget is not None else ""),
    ]
    if t.posthoc_ema.enabled:
        lines.append(
            f"post-hoc   EMA profiles sigma_rel {', '.join(f'{x:g}' for x in t.posthoc_ema.sigma_rels)} "
            f"tracked, a snapshot every {t.snapshot_every:,} steps (`ddpmkit ema` rebuilds other lengths)"
        )
    if cfg.conditioning.enabled:
        g = cfg.guidance
        lines.append(
            f"condition  class labels ({built.denoiser.num_classes} classes), label dropout "
            f"{cfg.conditioning.label_dropout:g}; sampling draws classes {cfg.sample.classes}"
            + (f", classifier-free guidance weight {g.weight:g}" if g.enabled and not cfg.trains_guide else "")
            + (f" at steps {g.interval[0]}..{g.interval[1]}" if g.enabled and g.interval else "")
        )
    if cfg.trains_guide:
        from ddpmkit.run.guide import build_guide

        guide, guide_built = build_guide(cfg)
        n = guide_built.denoiser.num_parameters()
        lines.append(
            f"guidance   weight {cfg.guidance.weight:g} (autoguidance): a guide of {n:,} parameters "
            f"({n / 1e6:.1f} M), trained {guide.train.max_steps:,} steps first, in {guide.run_dir}"
        )
    if cfg.plugins:
        lines.append("plugins    " + "; ".join(f"{name} {opts}" for name, opts in sorted(cfg.plugins.items())))
    return "\n".join(lines)


def _cost(built: Components) -> str:
    """``100 steps`` (or ``6 steps, 11 denoiser calls`` for a sampler that calls it more often than it steps)."""
    steps, calls = len(built.timesteps()), built.sampler.num_evaluations(built.schedule)
    return f"{steps} steps" + (f", {calls} denoiser calls" if calls != steps else "")
