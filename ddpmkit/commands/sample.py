"""``ddpmkit sample``: images from a run's (or a checkpoint's) weights, written as a grid or an .npz."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from ddpmkit.commands.app import (
    DeviceOption,
    GuidanceOption,
    NrowOption,
    SamplerOption,
    SamplingSetOption,
    SeedOption,
    StepsOption,
    app,
    console,
    sampling_overrides,
    user_errors,
    warn,
)
from ddpmkit.errors import EXIT_INTERRUPTED, ConfigError

if TYPE_CHECKING:
    import torch

    from ddpmkit.sampling.loaded import LoadedRun, SamplingPlan


@app.command()
@user_errors
def sample(
    source: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    num: int = typer.Option(16, "--num", min=1, help="Number of images."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = SeedOption,
    out: Path = typer.Option(
        Path("samples.png"),
        "--out",
        help=(
            "FILE.png (a grid), FILE.npz (uint8 NHWC 'images') or DIR (one PNG per image, as FID tools read, with "
            "DIR.npz and the grid DIR.png beside it)."
        ),
    ),
    scale: int = typer.Option(
        1, "--scale", min=1, max=16, help="Upscale the grid PNG N times (nearest neighbour), e.g. 4 for MNIST."
    ),
    nrow: int | None = NrowOption,
    raw: bool = typer.Option(False, "--raw", help="Use the raw weights instead of the EMA weights."),
    sampler: str | None = SamplerOption,
    steps: int | None = StepsOption,
    set_: list[str] | None = SamplingSetOption,
    classes: str | None = typer.Option(
        None,
        "--class",
        metavar="CLASSES",
        help="A conditional run's classes: 7, 0,3,7 (names work too) or all (a row per class); default: the config's.",
    ),
    guidance: float | None = GuidanceOption,
    device: str | None = DeviceOption,
) -> None:
    """Draw images from a trained run's checkpoint."""
    from ddpmkit.sampling.draw import SamplingInterrupted
    from ddpmkit.sampling.images import check_output_path, write_images
    from ddpmkit.sampling.loaded import load_run

    check_output_path(out)
    overrides = sampling_overrides(set_, guidance=guidance, steps=steps)
    loaded = load_run(
        source, weights="model" if raw else "ema", device=device, sampler=sampler, overrides=overrides, warn=warn
    )
    labels = loaded.labels(num, parse_classes(classes)) if classes is not None or loaded.conditional else None
    try:
        images = draw_with_progress(loaded, num, batch_size=batch_size, seed=seed, labels=labels)
    except SamplingInterrupted as stop:  # Ctrl-C: what is done is kept
        write_images(
            stop.images,
            out,
            labels=labels[: len(stop.images)] if labels is not None else None,
            classes=loaded.classes,
            scale=scale,
            nrow=nrow,
        )
        console.print(f"[yellow]interrupted[/] after {len(stop.images):,} of {num:,} images; wrote them to {out}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/] before the first batch of {batch_size:,} finished; nothing written")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    write_images(images, out, labels=labels, classes=loaded.classes, scale=scale, nrow=nrow)
    console.print(f"[green]wrote[/] {out}", highlight=False)


def parse_classes(text: str | None) -> str | list[str] | None:
    """``--class``: None (the config's), "all", or the comma-separated classes."""
    if text is None or text.strip() == "all":
        return None if text is None else "all"
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--class {text}: expected all, a class, or classes separated by commas (0,3,7)")
    return parts


def draw_with_progress(
    loaded: LoadedRun,
    num: int,
    *,
    batch_size: int,
    seed: int,
    plan: SamplingPlan | None = None,
    out: Console = console,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``num`` images in [-1, 1] from ``loaded``, announced in one line and shown with a progress bar on ``out``."""
    from ddpmkit.commands.progress import sampling_progress

    plan = plan or loaded.plan()
    out.print(
        escape(
            f"sampling {num} images from {loaded.source} ({'EMA' if loaded.weights == 'ema' else 'raw'} weights, "
            f"step {loaded.step}) with {plan.config.sampler.name} ({len(plan.timesteps)} steps) on {loaded.device}"
            + (f", {describe_labels(loaded, labels)}" if labels is not None else "")
            + (f", {_guidance_words(plan)} (weight {plan.config.guidance.weight:g})" if plan.guided else "")
        ),
        highlight=False,
    )
    with sampling_progress(out, num * len(plan.timesteps)) as advance:
        images, _ = loaded.draw(num, plan=plan, seed=seed, batch_size=batch_size, progress=advance, labels=labels)
    return images


def _guidance_words(plan: SamplingPlan) -> str:
    return "guided by its guide" if plan.config.guidance_method == "autoguidance" else "classifier-free guidance"


def describe_labels(loaded: LoadedRun, labels: torch.Tensor) -> str:
    """``classes 0, 3, 7`` (or ``all 10 classes``) for the announcement line."""
    present = sorted(set(labels.tolist()))
    if len(present) == len(loaded.classes):
        return f"all {len(present)} classes"
    return ("class " if len(present) == 1 else "classes ") + ", ".join(loaded.classes[i] for i in present)
