"""Running a sampler in batches, image grids and .npz files, the denoising strip, and `ddpmkit sample`."""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from rich.console import Console

from .data import to_uint8
from .limits import check_fits
from .speed import SpeedModes, autocast, maybe_compiled, memory_format
from .blame import blame
from .errors import EXIT_INTERRUPTED, ConfigError, DdpmkitError, DdpmkitWarning, PluginCodeError
from .guidance import guided
from .interfaces import Denoiser, NoiseSchedule, Sampler

if TYPE_CHECKING:
    from .plugins import Component

ProgressFn = Callable[[int], None]
#: The [train] keys that also decide how sampling runs, and so may change when sampling from a checkpoint.
SAMPLING_SPEED_KEYS = ("train.precision", "train.channels_last", "train.compile")
#: Keys outside [sampler], [sample] and [run] that sampling from a checkpoint may change.
SAMPLING_KEYS = (*SAMPLING_SPEED_KEYS, "guidance.weight")
#: Sampler output this far beyond [-1, 1] on more than OUT_OF_RANGE_SHARE of the pixels is reported.
OUT_OF_RANGE_SLACK = 0.05
OUT_OF_RANGE_SHARE = 0.001


class SamplingInterrupted(KeyboardInterrupt):
    """Ctrl-C during sampling, carrying the images of the batches finished before it."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(f"interrupted after {len(images)} images")
        self.images = images


def nearest_visited(requested: list[int], visited: list[int]) -> list[int]:
    """For each requested t, the visited t nearest to it (ties to the larger), without repeats, noisiest first."""
    if not visited:
        return []
    chosen = {min(visited, key=lambda v: (abs(v - r), -v)) for r in requested}
    return sorted(chosen, reverse=True)


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
    modes: SpeedModes | None = None,
    capture_steps: list[int] | None = None,
    progress: ProgressFn | None = None,
    sampler_component: "Component | None" = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Draw ``num_images`` images in [-1, 1] (on the CPU); optionally the intermediate x at ``capture_steps``.

    Batches are drawn one after another from one generator seeded with ``seed``. ``progress(n)`` is
    called after every step of a batch of n images. Output that is not finite is an error naming
    ``sampler_component``; output outside [-1, 1] is reported with a warning (the image writers clip it).
    ``modes`` (precision, channels-last, compilation) replaces ``precision`` when given.
    """
    device = denoiser.device
    modes = modes or SpeedModes(precision=precision)
    denoiser.to(memory_format=memory_format(modes.channels_last))
    network = maybe_compiled(denoiser, modes)
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

            guard = blame(sampler_component, "while sampling") if sampler_component else nullcontext()
            with guard, torch.inference_mode(), autocast(device, modes.precision):
                x = sampler.sample(network, schedule, (n, *image_shape), generator=generator, callback=callback)
                if not isinstance(x, torch.Tensor) or tuple(x.shape) != (n, *image_shape):
                    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"sample returned {got}, expected shape {(n, *image_shape)}")
            out.append(x.float().cpu())
    except KeyboardInterrupt:
        if out:  # keep the finished batches: the caller may write them
            raise SamplingInterrupted(torch.cat(out)) from None
        raise
    finally:
        denoiser.train(was_training)
    images = torch.cat(out) if out else torch.empty((0, *image_shape))
    _check_range(images, sampler_component)
    return images, {t: torch.cat(v) for t, v in captured.items() if v}


def _check_range(images: torch.Tensor, component: "Component | None") -> None:
    who = component.label if component is not None else "the sampler"
    if images.numel() == 0:
        return
    if not torch.isfinite(images).all():
        share = float((~torch.isfinite(images)).float().mean())
        raise PluginCodeError(f"{who} returned non-finite values in {share:.1%} of the pixels")
    outside = float((images.abs() > 1 + OUT_OF_RANGE_SLACK).float().mean())
    if outside > OUT_OF_RANGE_SHARE:
        warnings.warn(
            f"{who} returned values in [{float(images.min()):.3g}, {float(images.max()):.3g}]; "
            f"{outside:.1%} of the pixels lie outside [-1, 1] and are clipped in the image files",
            DdpmkitWarning,
            stacklevel=2,
        )


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


def check_output_path(path: Path) -> None:
    """ConfigError now, before any sampling, if ``path`` could not be written: it is a folder, or a
    file stands where one of its folders would be."""
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file name ending in .png or .npz")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
            break


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
    if Path(out).suffix.lower() not in (".png", ".npz"):
        raise ConfigError(f"--out {out}: must end in .png or .npz")
    check_output_path(Path(out))
    try:
        images, _ = draw_from_checkpoint(source, num=num, batch_size=batch_size, seed=seed, use_ema=use_ema,
                                         sampler=sampler, overrides=overrides, device=device, console=console)
    except SamplingInterrupted as stop:  # Ctrl-C: what is done is kept
        write_images(stop.images, out)
        console.print(f"[yellow]interrupted[/] after {len(stop.images):,} of {num:,} images; wrote them to {out}")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/] before the first batch of {batch_size:,} finished; nothing written")
        raise SystemExit(EXIT_INTERRUPTED) from None
    write_images(images, out)
    console.print(f"[green]wrote[/] {out}")


def draw_from_checkpoint(
    source: Path,
    *,
    num: int,
    batch_size: int,
    seed: int,
    use_ema: bool,
    sampler: str | None,
    overrides: list[str],
    device: str | None,
    console: Console,
) -> tuple[torch.Tensor, int]:
    """``num`` images in [-1, 1] from a run's latest (or a given) checkpoint, with its components or another
    sampler, and the number of network evaluations each image cost (a guided step counts the guide's too)."""
    from .checkpoint import find_checkpoint
    from .config import config_from_dict
    from .device import pick_device
    from .factory import build_components

    ckpt = find_checkpoint(source, warn=lambda m: console.print(f"[yellow]warning:[/] {m}", highlight=False))
    saved = ckpt.config_for_sampling()
    if sampler is not None and not _same_component("sampler", sampler, saved["sampler"]["name"]):
        saved["sampler"] = {"name": sampler, "options": {}}
    _refuse_process_changes(overrides)
    cfg = config_from_dict(saved, overrides=overrides)
    dev = pick_device(device or cfg.run.device)
    torch.manual_seed(0)
    built = build_components(cfg)
    _check_prediction(ckpt.schema.prediction, built, ckpt.path)
    denoiser = built.denoiser
    with blame(built.refs["denoiser"], "to load the checkpoint's weights"):
        denoiser.load_state_dict(ckpt.weights("ema" if use_ema else "model"))
    denoiser = guided(denoiser.to(dev), cfg, ckpt.path.parent.parent, built.schedule, weights="ema" if use_ema else "model")
    c, h, w = cfg.image_shape
    check_fits(num * c * h * w * 5, f"--num {num:,}", "ask for fewer images, or run sample several times with --seed")
    steps = len(built.timesteps())
    console.print(
        f"sampling {num} images from {ckpt.path} ({'EMA' if use_ema else 'raw'} weights, step {ckpt.step}) "
        f"with {cfg.sampler.name} ({steps} steps) on {dev}"
        + (f", guided by its guide (weight {cfg.guidance.weight:g})" if cfg.guidance.enabled else "")
    )
    with sampling_progress(console, num * steps) as advance:
        images, _ = generate(
            denoiser, built.schedule, built.sampler, num, batch_size=batch_size, seed=seed, image_shape=cfg.image_shape,
            modes=SpeedModes.for_run(cfg.train, dev), progress=advance, sampler_component=built.refs["sampler"],
        )
    # a guided step calls two networks: the count a guided sampler is compared by (seconds tell the cost)
    return images, steps * (2 if cfg.guidance.enabled else 1)


def _same_component(kind: str, a: str, b: str) -> bool:
    """Whether two names (plain or qualified) resolve to one installed component."""
    from . import plugins

    try:
        return plugins.find(kind, a) is plugins.find(kind, b)
    except DdpmkitError:
        return a == b


def _refuse_process_changes(overrides: list[str]) -> None:
    """Sampling with another process, model or data shape than the weights were trained with gives wrong images."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] not in ("sampler", "sample", "run") and key not in SAMPLING_KEYS:
            raise ConfigError(
                f"--set {item}: the weights were trained with the checkpoint's {key.split('.')[0]}; sampling may "
                "change only [sampler], [sample], [run], guidance.weight and train.precision/channels_last/compile"
            )


def _check_prediction(saved: str, built, path: Path) -> None:
    if built.denoiser.prediction != saved:
        raise ConfigError(
            f"{path}: trained to predict {saved!r} but {built.refs['denoiser'].label} now predicts "
            f"{built.denoiser.prediction!r}; install the plugin version that trained it"
        )


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
