"""Small run configs for tests, written as TOML text into a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = """
[run]
name = "{name}"
dir = "{run_dir}"
seed = {seed}
device = "cpu"

[data]
dataset = "synthetic"
num_samples = {num_samples}
image_size = 8

[schedule]
name = "linear"

[schedule.options]
num_timesteps = 20
beta_start = 1e-3
beta_end = 0.2

[denoiser]
name = "unet"

[denoiser.options]
channels = [8, 16, 32, 32]
attentions = [false, true, false, false]
upscales = [false, false, true, true]
num_groups = 4
num_heads = 2
dropout = {dropout}

[sampler]
name = "ddpm"

[train]
epochs = {epochs}
batch_size = 8
lr = 1e-3
ema_decay = 0.9
ema_warmup = true
grad_clip = 1.0
checkpoint_every = {checkpoint_every}
keep_checkpoints = 3
precision = "fp32"  # pinned: tests compare numbers, and "auto" may choose bf16 on some CPUs
channels_last = false

[sample]
num_images = {num_images}
batch_size = 8
trajectory_images = {trajectory_images}
trajectory_steps = [0, 5, 10, 19]
"""


def write_config(folder: Path, name: str = "t", **values) -> Path:
    fields = dict(
        name=name,
        run_dir=str(folder / "runs"),
        seed=0,
        num_samples=32,
        dropout=0.1,
        epochs=2,
        checkpoint_every=2,
        num_images=4,
        trajectory_images=2,
    )
    fields.update(values)
    path = folder / f"{name}.toml"
    path.write_text(TINY.format(**fields))
    return path


def trained_tiny(folder: Path, name: str, *args: str, **values) -> Path:
    """A tiny run trained through the CLI in ``folder`` (one epoch, no samples written; ``args``: more options of
    ``ddpmkit run``, e.g. ``--set``): its run directory."""
    cfg = write_config(folder, name, **{"epochs": 1, "num_images": 0, "trajectory_images": 0, **values})
    result = invoke("run", str(cfg), *args)
    assert result.exit_code == 0, result.output
    return folder / "runs" / name


def on_mnist(root: Path, limit: int = 64) -> list[str]:
    """``--set`` arguments training a tiny config on the first ``limit`` MNIST digits (8x8) instead of rectangles:
    eval and sweep measure digits only."""
    return [
        "--set",
        "data.dataset=mnist",
        "--set",
        f"data.root={root}",
        "--set",
        "data.download=false",
        "--set",
        f"data.limit={limit}",
    ]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DDPMKIT_NO_THIRD_PARTY_PLUGINS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def ddpmkit(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300):
    """Run the CLI as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ddpmkit", *args],
        cwd=cwd or REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke(*args: str):
    """Run the CLI in-process (Typer's runner): plugins registered in-process are seen; bugs still raise."""
    from typer.testing import CliRunner

    from ddpmkit.commands import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result
