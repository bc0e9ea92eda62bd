"""``ddpmkit edit``: SDEdit and inpainting of images with a trained run, written as a grid beside the inputs."""

from __future__ import annotations

from pathlib import Path

import typer

from ddpmkit.commands.app import (
    DeviceOption,
    GuidanceOption,
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


@app.command()
@user_errors
def edit(
    run: Path = typer.Argument(
        ..., help="A run directory (its latest checkpoint), a checkpoint or a diffusers folder."
    ),
    input: Path = typer.Option(..., "--input", help="An image, or a folder of images (resized to the run's size)."),
    mask: Path | None = typer.Option(
        None,
        "--mask",
        help="Inpaint: a gray image of the run's size, white where pixels are generated (the rest is kept exactly).",
    ),
    strength: float | None = typer.Option(
        None,
        "--strength",
        min=0.0,
        max=1.0,
        help="How far to noise the input: 0 keeps it, 1 draws afresh (default 0.5; with --mask, 1).",
    ),
    num: int = typer.Option(4, "--num", min=1, help="Results per input."),
    jump_length: int = typer.Option(
        10, "--jump-length", min=1, help="Inpainting: RePaint's steps per resampled stretch."
    ),
    resample: int = typer.Option(
        1, "--resample", min=1, help="Inpainting: walks of each stretch (RePaint: 10; 1 is plain pasting)."
    ),
    sampler: str | None = SamplerOption,
    steps: int | None = StepsOption,
    set_: list[str] | None = SamplingSetOption,
    classes: str | None = typer.Option(
        None, "--class", metavar="CLASSES", help="A conditional run's class for the results (default: the config's)."
    ),
    guidance: float | None = GuidanceOption,
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = SeedOption,
    out: Path | None = typer.Option(
        None,
        "--out",
        help="The grid (.png); the results go beside it as .npz (default: INPUT-edited.png beside the input).",
    ),
    scale: int = typer.Option(1, "--scale", min=1, max=16, help="Upscale the grid PNG N times."),
    device: str | None = DeviceOption,
) -> None:
    """Edit images with a trained model: SDEdit (--strength) or inpainting (--mask), with any sampler that can
    start from an image, the run's guidance and classes."""
    import torch

    from ddpmkit.commands.progress import sampling_progress
    from ddpmkit.commands.sample import parse_classes
    from ddpmkit.diffusion import start_step
    from ddpmkit.errors import ConfigError
    from ddpmkit.run.data import to_uint8
    from ddpmkit.sampling.edit import as_keep_mask, check_sampler, read_inputs, read_mask
    from ddpmkit.sampling.images import check_output_path, grid, save_png, write_images
    from ddpmkit.sampling.loaded import load_run

    target = out or input.with_name(input.stem + "-edited.png" if input.suffix else input.name + "-edited.png")
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--out {target}: the grid is a .png")
    check_output_path(target)
    overrides = sampling_overrides(set_, guidance=guidance, steps=steps)
    loaded = load_run(run, device=device, sampler=sampler, overrides=overrides, warn=warn)
    plan = loaded.plan()
    check_sampler(plan.sampler, plan.config.sampler.name, resample if mask is not None else 1)
    shape = plan.config.image_shape
    inputs = read_inputs(input, shape)
    generate_mask = read_mask(mask, shape) if mask is not None else None
    chosen = (1.0 if generate_mask is not None else 0.5) if strength is None else strength
    many = inputs.repeat_interleave(num, dim=0)
    labels = loaded.labels(len(many), parse_classes(classes)) if classes is not None or loaded.conditional else None
    schedule = plan.components.schedule
    t0 = start_step(plan.sampler.timesteps(schedule), chosen, schedule.num_timesteps)
    steps = sum(1 for t in plan.sampler.timesteps(schedule) if t0 is not None and t <= t0)
    console.print(
        f"editing {len(inputs)} image{'s' if len(inputs) > 1 else ''} from {input} with {loaded.source} "
        f"({plan.config.sampler.name}, {'inpainting, ' if generate_mask is not None else ''}strength {chosen:g}: "
        f"{steps} of its {len(plan.timesteps)} "
        f"steps{f', resampled {resample}x' if generate_mask is not None and resample > 1 else ''}"
        f"), {num} result{'s' if num > 1 else ''} each",
        highlight=False,
    )
    with sampling_progress(
        console, max(1, len(many) * steps * (resample if generate_mask is not None else 1))
    ) as advance:
        results = loaded.edit(
            many,
            strength=chosen,
            mask=generate_mask,
            plan=plan,
            seed=seed,
            batch_size=batch_size,
            labels=labels,
            jump_length=jump_length,
            resample=resample,
            progress=advance,
        )
    u8 = to_uint8(results)
    columns = [inputs]
    if generate_mask is not None:
        keep = as_keep_mask(generate_mask, len(inputs), shape)
        columns.append((inputs.float() * keep + 128 * (1 - keep)).round().to(torch.uint8))  # gray where generated
    cells = torch.cat([torch.stack(columns, dim=1), u8.view(len(inputs), num, *shape)], dim=1)
    save_png(grid(cells.flatten(0, 1), nrow=cells.shape[1]), target, scale)
    write_images(
        results, target.with_suffix(".npz"), labels=labels, classes=loaded.classes if labels is not None else None
    )
    console.print(
        f"[green]wrote[/] {target} (rows: input, {'mask, ' if generate_mask is not None else ''}{num} results) "
        f"and {target.with_suffix('.npz')}",
        highlight=False,
    )
