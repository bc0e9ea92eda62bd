"""A short human-readable description of what a config builds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import RunConfig
from .speed import SpeedModes

if TYPE_CHECKING:
    from .factory import Components


def describe_config(cfg: RunConfig, built: "Components") -> str:
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
        f"sampler    {refs['sampler'].qualified}, {len(built.timesteps())} steps, {cfg.sampler.options}",
        f"train      {t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}, EMA {t.ema_decay:g}"
        f"{' with warm-up' if t.ema_warmup else ''}, "
        f"{SpeedModes(t.precision, channels_last=t.channels_last, compile=t.compile, fused_adam=bool(t.fused_adam)).describe()}"
        + (f", at most {t.max_steps} steps" if t.max_steps is not None else ""),
    ]
    if cfg.guidance.enabled:
        from .guidance import build_guide

        guide, guide_built = build_guide(cfg)
        n = guide_built.denoiser.num_parameters()
        lines.append(f"guidance   weight {cfg.guidance.weight:g} (autoguidance): a guide of {n:,} parameters "
                     f"({n / 1e6:.1f} M), trained {guide.train.max_steps:,} steps first, in {guide.run_dir}")
    if cfg.plugins:
        lines.append("plugins    " + "; ".join(f"{name} {opts}" for name, opts in sorted(cfg.plugins.items())))
    return "\n".join(lines)

