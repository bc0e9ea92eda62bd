"""``ddpmkit ema``: rebuild the EMA of other lengths from a run's post-hoc EMA snapshots."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ddpmkit.commands.app import app, console, print_table, user_errors


@app.command()
@user_errors
def ema(
    run: Path = typer.Argument(..., help="A run directory trained with [train.posthoc_ema] enabled = true."),
    sigma_rel: str = typer.Option(
        "0.02,0.05,0.1,0.2",
        "--sigma-rel",
        metavar="S[,S...]",
        help="The EMA lengths to rebuild, as widths relative to the training (sigma_rel, at most 0.3).",
    ),
) -> None:
    """Rebuild the EMA weights of each length (Karras et al. 2024's post-hoc EMA) by the least-squares fit to the
    stored snapshots, each written as RUN/posthoc-ema/sigma-S, a folder `sample`, `eval` and `sweep` read."""
    from ddpmkit.training.posthoc_ema import parse_sigma_rels, rebuild_run

    done = rebuild_run(run, parse_sigma_rels(sigma_rel))
    first = done[0][0]
    table = Table(
        title=f"EMA lengths rebuilt at step {first.step:,} from {first.snapshots} snapshots",
        caption="fit: relative L2 distance between the rebuilt profile and the one asked for (0 = exact)",
    )
    for col in ("sigma_rel", "gamma", "fit", "folder"):
        table.add_column(col)
    for r, folder in done:
        table.add_row(f"{r.sigma_rel:g}", f"{r.gamma:.2f}", f"{r.fit_error:.1e}", str(folder))
    print_table(table)
    console.print(
        f"sample one with `ddpmkit sample {done[0][1]}`, or compare them with `ddpmkit sweep {run} --ema {sigma_rel}`",
        highlight=False,
    )
