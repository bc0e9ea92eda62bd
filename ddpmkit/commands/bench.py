"""``ddpmkit bench``: training and sampling speed in each speed mode beside the tutorial's own loops."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ddpmkit.commands.app import (
    DeviceOption,
    JsonOption,
    SetOption,
    app,
    check_output_file,
    console,
    err_console,
    print_table,
    user_errors,
    with_device,
)
from ddpmkit.errors import DdpmkitError


@app.command()
@user_errors
def bench(
    config: Path = typer.Argument(..., help="The run's TOML config (its denoiser, batch sizes and sampler)."),
    set_: list[str] | None = SetOption,
    steps: int = typer.Option(10, "--steps", min=1, help="Timed training steps per mode (after the warm-up)."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed training steps first (set-up, compilation)."),
    sample_steps: int = typer.Option(10, "--sample-steps", min=1, help="Timed sampler steps per mode."),
    modes: str | None = typer.Option(
        None,
        "--modes",
        help="Comma-separated speed modes, e.g. fp32,bf16+cl,bf16+cl+compile (default: all for the device).",
    ),
    no_sample: bool = typer.Option(False, "--no-sample", help="Measure training only."),
    rounds: int = typer.Option(
        1,
        "--rounds",
        min=1,
        help="Measure training in this many interleaved rounds (tutorial, then each mode): medians, steadier ratios.",
    ),
    sample_batches: str = typer.Option(
        "", "--sample-batches", help="Also sample at these batch sizes in the fastest mode, e.g. 16,256."
    ),
    device: str | None = DeviceOption,
    as_json: bool = JsonOption,
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON to this file."),
) -> None:
    """Training and sampling speed of ddpmkit in each speed mode beside the tutorial's own loops, in one process.

    Random images of the config's shape stand in for the data; nothing is written but --out.
    """
    from ddpmkit.benchmark.bench import parse_modes, run_bench
    from ddpmkit.run.config import load_config
    from ddpmkit.run.data import settle
    from ddpmkit.runtime.device import pick_device

    if out is not None:
        check_output_file(out, "--out")  # before the measurement, which takes minutes
    cfg = settle(load_config(config, with_device(set_, device)))
    dev = pick_device(cfg.run.device)
    chosen = parse_modes(modes) if modes else None
    try:
        batches = tuple(int(b) for b in sample_batches.split(",") if b.strip())
    except ValueError:
        raise DdpmkitError(
            f"--sample-batches {sample_batches}: expected comma-separated batch sizes, e.g. 16,256"
        ) from None
    if any(b < 1 for b in batches):
        raise DdpmkitError(f"--sample-batches {sample_batches}: batch sizes must be at least 1")
    say = err_console if as_json else console
    # one line per measurement as it starts: an emulated mode can take minutes, and a status spinner shows
    # nothing when the output is not a terminal
    result = run_bench(
        cfg,
        dev,
        modes=chosen,
        steps=steps,
        warmup=warmup,
        sample_steps=sample_steps,
        sample=not no_sample,
        sample_batches=batches,
        rounds=rounds,
        note=lambda text: say.print(f"measuring {text} ...", highlight=False),
    )
    result["config"] = str(config)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        print(text)
    else:
        _print_bench(result)


def _print_bench(r: dict) -> None:
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["matmul_peak_flop_per_s"].items())
    console.print(
        f"[bold]ddpmkit bench[/] {r['config']}: {r['denoiser']} {r['parameters']:,} parameters, "
        f"{'x'.join(map(str, r['image_shape']))}, on {r['device']} ({r['device_name']}, {r['threads']} threads"
        f"{'; ' + ' '.join(r['cpu_features']) if r.get('cpu_features') else ''}), "
        f"torch {r['torch']}\n  matmul peak GFLOP/s: {peaks}; "
        f"{r['flops_per_image']['train'] / 1e9:.2f} GFLOP per training image, "
        f"{r['flops_per_image']['forward'] / 1e9:.2f} per forward pass; memory: {r['memory']}",
        highlight=False,
    )
    for key, title, unit in (
        (
            "training",
            f"training, batch {r['batch_size']}: median of {r['timed_steps']} steps after {r['warmup_steps']}"
            + (f", median of {r['rounds']} interleaved rounds" if r.get("rounds", 1) > 1 else ""),
            "images/s",
        ),
        ("sampling", f"sampling: {r['sample_steps']} steps", "image-steps/s"),
    ):
        if not r[key]:
            continue
        table = Table(title=title, title_justify="left")
        for col in ("loop", "mode", unit, "x tutorial", "GFLOP/s", "of peak", "memory", "set-up s"):
            table.add_column(col, justify="left" if col in ("loop", "mode") else "right")
        for row in r[key]:
            auto = key == "training" and row["loop"] == "ddpmkit" and row["mode"] == r.get("auto")
            table.add_row(
                row["loop"],
                row["mode"] + (" (auto)" if auto else ""),
                f"{row['per_s']:.1f}",
                _ratio(row),
                f"{row['flop_per_s'] / 1e9:.1f}",
                f"{row['utilisation']:.0%}" if row["utilisation"] else "",
                f"{row['peak_memory'] / 2**20:,.0f} MiB",
                f"{row['setup_s']:.1f}" if row["setup_s"] is not None else "",
            )
        print_table(table)
        if key == "training" and r.get("ceiling"):
            at_peak = ", ".join(
                f"{name} {c['per_s']:,.1f} images/s ({c['ratio']:.2f}x the tutorial)"
                for name, c in r["ceiling"].items()
            )
            console.print(f"  every FLOP of a step at the measured matmul peak: {at_peak}", highlight=False)
    for mode, error in r.get("failed", {}).items():
        console.print(f"  {mode} failed here, left out: {error}", highlight=False)
    from ddpmkit.benchmark.bench import CUDA_ONLY_FLAGS

    named = {flag for row in r["training"] + r["sampling"] for flag in row["mode"].split("+")}
    cuda_only = sorted(named & CUDA_ONLY_FLAGS)
    if cuda_only and not r["device"].startswith("cuda"):
        console.print(
            f"  {', '.join(cuda_only)}: CUDA only; on {r['device']} a mode with "
            f"{'them' if len(cuda_only) > 1 else 'it'} trains the same step as without",
            highlight=False,
        )


def _ratio(row: dict) -> str:
    """The ratio to the tutorial, with its range over interleaved rounds when there were several."""
    spread = row.get("round_ratios")
    return f"{row['ratio']:.2f}" + (f" ({min(spread):.2f}-{max(spread):.2f})" if spread else "")
