"""A short human-readable description of what a config builds."""

from __future__ import annotations

from .config import RunConfig


def describe_config(cfg: RunConfig) -> str:
    """Lines naming the data, schedule, denoiser (with its parameter count), sampler and training plan."""
    from .factory import denoiser_from_config

    denoiser = denoiser_from_config(cfg)
    params = sum(p.numel() for p in denoiser.parameters())
    c, h, w = cfg.image_shape
    t = cfg.train
    lines = [
        f"run        {cfg.run_dir}  (seed {cfg.run.seed}, device {cfg.run.device})",
        f"data       {cfg.data.dataset}, {c}x{h}x{w}",
        f"schedule   {cfg.schedule.name}, T = {cfg.num_timesteps}",
        f"denoiser   {cfg.denoiser.name}, {params:,} parameters ({params / 1e6:.1f} M)",
        f"sampler    {cfg.sampler.name} {cfg.sampler.options}",
        f"train      {t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}, EMA {t.ema_decay:g}"
        f"{' with warm-up' if t.ema_warmup else ''}, {t.precision}"
        + (f", at most {t.max_steps} steps" if t.max_steps is not None else ""),
    ]
    return "\n".join(lines)
