"""``ddpmkit serve``: a local web page to draw from and edit with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from ddpmkit.commands.app import DeviceOption, app, console, user_errors, warn

LOCALHOST = "127.0.0.1"


@app.command()
@user_errors
def serve(
    run: Path = typer.Argument(
        ..., help="A run directory (its latest checkpoint), a checkpoint or a diffusers folder."
    ),
    host: str = typer.Option(
        LOCALHOST,
        "--host",
        help="The address to listen on (default: this machine only; 0.0.0.0 opens it to the network).",
    ),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="The port."),
    device: str | None = DeviceOption,
) -> None:
    """Start a page in the browser that draws samples by class, guidance weight, sampler and steps, shows the
    denoising strip, and edits an uploaded image (SDEdit, or inpainting where a mask is brushed). Ctrl-C stops it."""
    from ddpmkit.extras import require

    require("ui", "ddpmkit serve")
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page reports nothing anywhere
    from ddpmkit.sampling.loaded import load_run
    from ddpmkit.serving.page import Studio, build_page

    studio = Studio(load_run(run, device=device, warn=warn))
    page = build_page(studio)
    if host != LOCALHOST and host != "localhost":
        warn(f"listening on {host}: anyone who can reach this machine on port {port} can use the page")
    console.print(f"serving {studio.describe()}", highlight=False)
    console.print(
        f"open http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port} (Ctrl-C stops it)", highlight=False
    )
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            show_error=True,
            footer_links=[],
            prevent_thread_lock=False,
            run_history=False,
        )
    except OSError as exc:
        from ddpmkit.errors import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port}: {exc} (another --port?)") from None
