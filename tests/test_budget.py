"""``train.time_budget``: steps planned from the measured rate (a fake timer here), the guide's time inside the
budget, the plan recorded and kept on resume, and the learning-rate schedule laid over the planned steps."""

from __future__ import annotations

import json

import pytest
import torch

import ddpmkit.training.autotune as autotune
from ddpmkit.run.config import load_config
from ddpmkit.training.budget import PLANNED_SHARE, plan
from ddpmkit.training.runner import RunReport, run_config
from runconfigs import invoke, write_config


def _budget_config(tmp_path, name="b", budget="2s", extra="", **values):
    path = write_config(tmp_path, name, **values)
    path.write_text(path.read_text().replace("keep_checkpoints = 3", f'keep_checkpoints = 3\ntime_budget = "{budget}"') + extra)
    return path


def _fake(rate_by_channels):
    """A timer: images/s by the model's first channel count (the guide is the smaller network)."""
    return lambda cfg, modes, device: rate_by_channels[cfg.denoiser.options["channels"][0]]


def test_the_plan_fits_the_budget_with_the_guide_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    guide = '\n[guidance]\nweight = 2.0\nsteps = 10\n\n[guidance.denoiser_options]\nchannels = [4, 8, 16, 16]\nnum_groups = 2\n'
    cfg = load_config(_budget_config(tmp_path, budget="1m", extra=guide))
    assert cfg.train.time_budget == 60
    p = plan(cfg, torch.device("cpu"), timer=_fake({8: 100.0, 4: 400.0}))
    assert p.guide_s == pytest.approx(10 * 8 / 400.0)
    assert p.steps == int((60 * PLANNED_SHARE - p.guide_s) * 100.0 / 8) and p.images_per_s == 100.0
    capped = load_config(_budget_config(tmp_path, "c", budget="1m"), ["train.max_steps=7"])
    assert plan(capped, torch.device("cpu"), timer=_fake({8: 100.0})).steps == 7


def test_a_budget_too_small_for_one_step_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 0.5}))
    r = invoke("validate", str(_budget_config(tmp_path, budget="1s")))
    assert r.exit_code == 2 and "fits no training step here" in r.output, r.output


@pytest.mark.parametrize("value", ["soon", "-5m", "0"])
def test_a_bad_budget_is_a_user_error(value, tmp_path):
    r = invoke("validate", str(write_config(tmp_path, "v")), "--no-timing", "--set", f"train.time_budget={value}")
    assert r.exit_code == 2 and "train.time_budget" in r.output, r.output


def test_a_budgeted_run_trains_the_planned_steps_and_keeps_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 80.0}))
    cfg = load_config(_budget_config(tmp_path, "r", budget="2s", num_images=0, trajectory_images=0))
    said: list[str] = []
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    steps = int(2 * PLANNED_SHARE * 80.0 / 8)
    assert any(f"time budget 0m 02s: {steps:,} steps at the 80.0 images/s measured here" in s for s in said), said
    assert any("of the budget" in s for s in said)
    run = tmp_path / "runs" / "r"
    state = json.loads((run / "checkpoints" / f"step-{steps:08d}" / "state.json").read_text())
    assert state["time_plan"]["steps"] == steps and state["lr_decay_end"] == steps
    # the same run again, on a "machine" twice as fast: the recorded plan stands, nothing more is trained
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 160.0}))
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "other-cache"))
    said.clear()
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    assert any("planned at the run's first start" in s for s in said), said
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{steps:08d}"
