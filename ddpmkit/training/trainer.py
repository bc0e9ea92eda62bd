"""``ddpmkit.train``: train a run from Python, as ``ddpmkit run`` does, and get it back loaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ddpmkit.errors import EXIT_INTERRUPTED
from ddpmkit.run.config import Override, RunConfig, config_from_dict, data_root_override, load_config

if TYPE_CHECKING:
    from ddpmkit.sampling.loaded import LoadedRun
    from ddpmkit.training.runner import RunReport


def train(
    config: RunConfig | str | Path,
    *,
    overrides: list[Override] | None = None,
    fresh: bool = False,
    data_root: str | Path | None = None,
    report: RunReport | None = None,
) -> LoadedRun:
    """Train (or resume) the run ``config`` describes (a config, or the path of its TOML file, with ``overrides``
    as ``--set`` gives them), write its samples, and return it loaded for drawing more.

    Silent unless ``report`` says where its messages and progress go (``RunReport(info=print)``). A Ctrl-C
    checkpoints and raises KeyboardInterrupt; running it again resumes.
    """
    from ddpmkit.sampling.loaded import load_run
    from ddpmkit.training.runner import run_config

    given = list(overrides or []) + ([data_root_override(data_root, f"data_root={data_root}")] if data_root else [])
    if isinstance(config, RunConfig):
        cfg = config_from_dict(config.model_dump(mode="json"), overrides=given) if given else config
    else:
        cfg = load_config(config, given)
    code = run_config(cfg, report=report, fresh=fresh)
    if code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt(f"training of {cfg.run_dir} interrupted; its last checkpoint is kept")
    return load_run(cfg.run_dir, device=cfg.run.device)
