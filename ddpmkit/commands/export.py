"""``ddpmkit export``: a run as a folder other tools load (HuggingFace diffusers)."""

from __future__ import annotations

from pathlib import Path

import typer

from ddpmkit.commands.app import DeviceOption, app, console, user_errors, warn


@app.command()
@user_errors
def export(
    run: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    out: Path = typer.Argument(..., help="A new (or empty) folder to write."),
    format: str = typer.Option(
        "diffusers", "--format", help="diffusers: a pipeline folder diffusers' from_pretrained loads."
    ),
    license: str = typer.Option(
        "other", "--license", help="The model card's licence field (a Hub licence id, e.g. mit)."
    ),
    raw: bool = typer.Option(False, "--raw", help="Export the raw weights instead of the EMA weights."),
    device: str | None = DeviceOption,
) -> None:
    """Write a trained run for another library: its weights, the scheduler of its process and a model card."""
    from ddpmkit.errors import ConfigError
    from ddpmkit.sampling.diffusers_io import export_diffusers
    from ddpmkit.sampling.loaded import load_run

    if format != "diffusers":
        raise ConfigError(f"--format {format}: the one format is diffusers")
    loaded = load_run(run, weights="model" if raw else "ema", device=device or "cpu", warn=warn)
    done = export_diffusers(loaded, out, license=license)
    if done.pipeline:
        console.print(
            f"[green]wrote[/] {out}: diffusers.{done.pipeline}.from_pretrained({str(out)!r}) loads it "
            f"({len(done.files)} files, model card README.md)",
            highlight=False,
        )
    else:
        console.print(
            f"[yellow]wrote[/] {out}: the scheduler, the weights (safetensors) and a model card; diffusers "
            f"cannot build the {loaded.config.denoiser.name} architecture, so no pipeline loads it "
            "(train with denoiser diffusers-unet for one that does)",
            highlight=False,
        )
