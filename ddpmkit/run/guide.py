"""The guide network's run for autoguidance (:mod:`ddpmkit.guidance`): its config, folder and components.

The guide trains first, as a run of its own inside the main run's folder (RUN/guide), on the same data,
schedule and conditioning; :mod:`ddpmkit.sampling.loaded` loads it to sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddpmkit.run.components import Components
    from ddpmkit.run.config import RunConfig

#: The guide's run folder, inside the main run's folder.
GUIDE_DIR = "guide"


def guide_dir(run_dir: Path) -> Path:
    return Path(run_dir) / GUIDE_DIR


def guide_config(cfg: RunConfig) -> RunConfig:
    """The guide's run: ``cfg`` with ``[guidance] denoiser_options`` over the denoiser's options, trained for
    ``guidance.steps`` (at most the main run's steps) in RUN/guide, without compilation, sampling nothing."""
    from ddpmkit.run.config import config_from_dict

    data = cfg.model_dump(mode="json")
    data["run"].update(dir=str(cfg.run_dir), name=GUIDE_DIR)
    data["denoiser"]["options"] = {**data["denoiser"]["options"], **cfg.guidance.denoiser_options}
    main_steps = data["train"]["max_steps"]
    data["train"].update(
        max_steps=min(cfg.guidance.steps, main_steps) if main_steps is not None else cfg.guidance.steps,
        keep_checkpoints=1,
        compile=False,  # a few hundred steps never repay the compiler's set-up
        time_budget=None,  # the main run's budget covers the guide
        smaller_models=[],
        budget_min_steps=None,  # and chooses its size
    )
    data["sample"].update(num_images=0, trajectory_images=0)
    data["guidance"] = {}
    return config_from_dict(data)


def build_guide(cfg: RunConfig, classes: list[str] | None = None) -> tuple[RunConfig, Components]:
    """The guide's run config and its freshly built (untrained) components (for ``classes`` when conditional)."""
    from ddpmkit.run.components import build_components

    guide = guide_config(cfg)
    return guide, build_components(guide, classes)
