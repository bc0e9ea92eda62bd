"""Running a sampler in batches, image grids and .npz files, the denoising strip, and `ddpmkit sample`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from rich.console import Console

from .data import to_uint8
from .device import autocast
from .errors import ConfigError, DdpmkitError
from .interfaces import Denoiser, NoiseSchedule, Sampler

ProgressFn = Callable[[int], None]


def generate(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sampler: Sampler,
    num_images: int,
    *,
    batch_size: int,
    seed: int,
    image_shape: tuple[int, int, int],
    precision: str = "fp32",
    capture_steps: list[int] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Draw ``num_images`` images in [-1, 1] (on the CPU); optionally the intermediate x at ``capture_steps``.

    Batches are drawn one after another from one generator seeded with ``seed``.
    """
    device = next(denoiser.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    wanted = set(capture_steps or [])
    captured: dict[int, list[torch.Tensor]] = {t: [] for t in wanted}
    out = []
    was_training = denoiser.training
    denoiser.eval()
    try:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)

            def callback(index: int, t: int, x: torch.Tensor) -> None:
                if t in wanted:
                    captured[t].append(x.float().cpu())
                if progress is not None:
                    progress(n)

            with torch.no_grad(), autocast(device, precision):
                x = sampler.sample(denoiser, schedule, (n, *image_shape), generator=generator, callback=callback)
            out.append(x.float().cpu())
    finally:
        denoiser.train(was_training)
    images = torch.cat(out) if out else torch.empty((0, *image_shape))
    return images, {t: torch.cat(v) for t, v in captured.items() if v}


def grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 HxWxC (or HxW) array of rows of ``nrow`` images."""
    from torchvision.utils import make_grid

    g = make_grid(images, nrow=max(1, nrow), padding=padding, pad_value=128)
    arr = g.permute(1, 2, 0).numpy()
    return arr[:, :, 0] if images.shape[1] == 1 else arr


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def write_images(images: torch.Tensor, path: Path) -> None:
    """Write model-scale images as a grid (``.png``) or as uint8 NHWC under ``images`` (``.npz``)."""
    path = Path(path)
    u8 = to_uint8(images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".npz":
            np.savez_compressed(path, images=u8.permute(0, 2, 3, 1).numpy())
        elif path.suffix.lower() == ".png":
            save_png(grid(u8, nrow=int(np.ceil(np.sqrt(len(u8))))), path)
        else:
            raise ConfigError(f"{path}: output must end in .png or .npz")
    except OSError as exc:
        raise DdpmkitError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_trajectory(captured: dict[int, torch.Tensor], path: Path) -> None:
    """The denoising strip: one row per image, columns from the noisiest captured t to t = 0."""
    steps = sorted(captured, reverse=True)
    if not steps:
        return
    cells = torch.stack([to_uint8(captured[t]) for t in steps], dim=1)  # [rows, steps, C, H, W]
    body = grid(cells.flatten(0, 1), nrow=len(steps))
    save_png(_with_column_labels(body, [f"{t}" for t in steps], cell=cells.shape[-1] + 2), Path(path))


def _with_column_labels(body: np.ndarray, labels: list[str], cell: int) -> np.ndarray:
    """``body`` with a band above it naming each column (here: the step t)."""
    from PIL import Image, ImageDraw

    band = 12
    img = Image.new("L" if body.ndim == 2 else "RGB", (body.shape[1], body.shape[0] + band), color=0)
    img.paste(Image.fromarray(body), (0, band))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        width = draw.textlength(text)
        draw.text((2 + i * cell + (cell - 2 - width) / 2, 0), text, fill=255 if body.ndim == 2 else (255, 255, 255))
    return np.asarray(img)


def sample_command(
    source: Path,
    *,
    num: int,
    batch_size: int,
    seed: int,
    out: Path,
    use_ema: bool,
    sampler: str | None,
    overrides: list[str],
    device: str | None,
    console: Console,
) -> None:
    """`ddpmkit sample`: images from a run's (or a checkpoint's) weights, written to ``out``."""
    from .checkpoint import find_checkpoint
    from .config import config_from_dict
    from .device import pick_device
    from .factory import create_sampler, create_schedule, denoiser_from_config

    if Path(out).suffix.lower() not in (".png", ".npz"):
        raise ConfigError(f"--out {out}: must end in .png or .npz")
    ckpt = find_checkpoint(source, warn=lambda m: console.print(f"[yellow]warning:[/] {m}", highlight=False))
    saved = dict(ckpt.state["config"])
    if sampler is not None:
        saved["sampler"] = {"name": sampler, "options": {}}
    cfg = config_from_dict(saved, overrides=overrides)
    dev = pick_device(device or cfg.run.device)
    schedule = create_schedule(cfg.schedule.name, **cfg.schedule.options)
    torch.manual_seed(0)
    denoiser = denoiser_from_config(cfg)
    denoiser.load_state_dict(ckpt.weights("ema" if use_ema else "model"))
    denoiser.to(dev)
    smp = create_sampler(cfg.sampler.name, **cfg.sampler.options)
    console.print(
        f"sampling {num} images from {ckpt.path} ({'EMA' if use_ema else 'raw'} weights, step {ckpt.step}) "
        f"with {cfg.sampler.name} on {dev}"
    )
    with sampling_progress(console, num * cfg.num_timesteps) as advance:
        images, _ = generate(
            denoiser, schedule, smp, num, batch_size=batch_size, seed=seed, image_shape=cfg.image_shape,
            precision=cfg.train.precision, progress=advance,
        )
    write_images(images, out)
    console.print(f"[green]wrote[/] {out}")


@contextmanager
def sampling_progress(console: Console, total: int, description: str = "sampling") -> Iterator[ProgressFn]:
    """A rich progress bar over image-steps; yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("image-steps"),
        TimeRemainingColumn(), console=console,
    )
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)
