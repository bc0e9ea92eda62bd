"""Logs a run to Weights & Biases when ``[plugins.wandb] enabled = true`` (the extra ``ddpmkit[wandb]``).

The config, every ``log_every``-th step's loss, learning rate and images/s, the sample grids and the figures
of ``ddpmkit eval RUN`` go to one wandb run per ddpmkit run: its id is kept in ``<run>/wandb-id.txt``, so a resumed
run continues the same wandb
run. ``WANDB_MODE=offline`` (or ``mode = "offline"``) writes the wandb files under ``<run>/wandb`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ddpmkit import hookimpl
from ddpmkit.errors import MissingExtra

DDPMKIT_PLUGIN_API = [2]
ID_FILE = "wandb-id.txt"


class Options(BaseModel):
    """The ``[plugins.wandb]`` table."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="log the run to Weights & Biases (needs ddpmkit[wandb])")
    project: str = Field("ddpmkit", description="the wandb project")
    entity: str | None = Field(None, description="the wandb team or user (unset: your default)")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None,
        description="online, offline (files under <run>/wandb, to `wandb sync` later) or disabled; unset: "
        "WANDB_MODE, else online",
    )
    log_every: int = Field(10, ge=1, description="log the training metrics every N steps")
    tags: list[str] = Field(default_factory=list, description="tags of the wandb run")


_runs: dict[Path, Any] = {}
_steps: dict[Path, int] = {}


def _run_id(run_dir: Path, resuming: bool) -> str:
    """The wandb run id of this ddpmkit run: made when it starts from step 0 (also after --fresh), read back
    on every resume."""
    path = run_dir / ID_FILE
    if resuming and path.is_file():
        text = path.read_text().strip()
        if text.isalnum():
            return text
    import secrets

    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id


def _init(run: Any, options: Options, resuming: bool) -> Any:
    try:
        import wandb
    except ImportError:
        raise MissingExtra(
            "[plugins.wandb] enabled = true needs the wandb package: pip install 'ddpmkit[wandb]'"
        ) from None
    run_dir = Path(run.run_dir)
    return wandb.init(
        project=options.project,
        entity=options.entity,
        id=_run_id(run_dir, resuming),
        resume="allow",
        dir=str(run_dir),
        name=run.config.run.name,
        config=run.config.model_dump(mode="json"),
        tags=options.tags or None,
        mode=options.mode,
        reinit="create_new",
    )


@hookimpl
def train_start(run: Any, options: Options) -> None:
    if not options.enabled:
        return
    _runs[Path(run.run_dir)] = _init(run, options, run.start_step > 0)
    _steps[Path(run.run_dir)] = run.start_step


@hookimpl
def step_end(run: Any, step: int, metrics: dict[str, Any], options: Options) -> None:
    logged = _runs.get(Path(run.run_dir))
    if logged is None:
        return
    _steps[Path(run.run_dir)] = step
    if step % options.log_every == 0 or step == run.start_step + 1:
        logged.log(
            {
                f"train/{key}": metrics[key]
                for key in ("loss", "lr", "images_per_s", "grad_norm")
                if isinstance(metrics.get(key), (int, float))
            },
            step=step,
        )


@hookimpl
def samples_written(run: Any, paths: list[Any]) -> None:
    run_dir = Path(run.run_dir)
    logged = _runs.pop(run_dir, None)
    if logged is None:
        return
    import wandb

    pictures = {f"samples/{Path(p).stem}": wandb.Image(str(p)) for p in paths if str(p).endswith(".png")}
    if pictures:
        logged.log(pictures, step=_steps.get(run_dir, run.start_step))
    logged.finish()


@hookimpl
def train_end(run: Any, interrupted: bool) -> None:
    if interrupted:  # no samples follow: the wandb run ends here (a resume continues it)
        logged = _runs.pop(Path(run.run_dir), None)
        if logged is not None:
            logged.finish(exit_code=1)


@hookimpl
def evaluated(run: Any, result: dict[str, Any], options: Options) -> None:
    if not options.enabled:
        return
    logged = _init(run, options, resuming=True)  # the run's own wandb run, continued
    figures = {
        f"eval/{part}/{key}": value
        for part in ("samples", "floor")
        for key, value in result.get(part, {}).items()
        if isinstance(value, (int, float))
    }
    logged.log({**figures, "eval/num_samples": result.get("num_samples")}, step=run.start_step)
    logged.finish()
