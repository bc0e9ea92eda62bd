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

pytestmark = pytest.mark.usefixtures("one_thread")


def _budget_config(tmp_path, name="b", budget="2s", extra="", **values):
    path = write_config(tmp_path, name, **values)
    path.write_text(path.read_text().replace("keep_checkpoints = 3", f'keep_checkpoints = 3\ntime_budget = "{budget}"') + extra)
    return path


def _fake(rate_by_channels):
    """A timer: images/s by the model's first channel count (the guide is the smaller network)."""
    return lambda cfg, modes, device: rate_by_channels[cfg.denoiser.options["channels"][0]]


def _fake_steady(ips, setup_s=0.0):
    """A timer of steady training: ``ips`` images/s after ``setup_s`` seconds, whatever the choice expected."""
    return lambda cfg, modes, device, expected: (ips, setup_s)


GUIDE = '\n[guidance]\nweight = 2.0\nsteps = 10\n\n[guidance.denoiser_options]\nchannels = [4, 8, 16, 16]\nnum_groups = 2\n'


def test_the_plan_fits_the_budget_with_the_guide_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(_budget_config(tmp_path, budget="1m", extra=GUIDE))
    assert cfg.train.time_budget == 60
    p = plan(cfg, torch.device("cpu"), timer=_fake({8: 100.0, 4: 400.0}))
    assert p.guide_s == pytest.approx(10 * 8 / 400.0)
    assert p.steps == int((60 * PLANNED_SHARE - p.guide_s) * 100.0 / 8) and p.images_per_s == 100.0
    # the plan the run keeps: the guide's real time and steady training measured when the main network starts
    final = plan(cfg, torch.device("cpu"), timer=_fake({8: 100.0, 4: 400.0}), final=True, guide_took=3.0,
                 rate_timer=_fake_steady(90.0, setup_s=2.0))
    assert final.steps == int((60 * PLANNED_SHARE - 3.0 - 2.0) * 90.0 / 8)
    assert (final.guide_s, final.setup_s, final.guide_trained) == (3.0, 2.0, True)
    assert final.describe() == f"time budget 1m 00s: the guide took 0m 03s, then {final.steps:,} steps at the 90.0 images/s measured here after 2 s of set-up"
    capped = load_config(_budget_config(tmp_path, "c", budget="1m"), ["train.max_steps=7"])
    assert plan(capped, torch.device("cpu"), timer=_fake({8: 100.0})).steps == 7


def test_a_budget_too_small_for_one_step_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 0.5}))
    r = invoke("validate", str(_budget_config(tmp_path, budget="1s")))
    assert r.exit_code == 2 and "fits no training step here" in r.output, r.output


def test_a_configs_budget_can_be_turned_off(tmp_path):
    path = _budget_config(tmp_path, budget="15m")
    assert load_config(path).train.time_budget == 900
    for off in ("off", "none", "OFF"):
        assert load_config(path, [f"train.time_budget={off}"]).train.time_budget is None
    r = invoke("validate", str(path), "--no-timing")
    assert r.exit_code == 0 and "a time budget of 15m 00s" in r.output, r.output
    r = invoke("validate", str(path), "--no-timing", "--set", "train.time_budget=off")
    assert r.exit_code == 0 and "time budget" not in r.output, r.output


@pytest.mark.parametrize("value", ["soon", "-5m", "0"])
def test_a_bad_budget_is_a_user_error(value, tmp_path):
    r = invoke("validate", str(write_config(tmp_path, "v")), "--no-timing", "--set", f"train.time_budget={value}")
    assert r.exit_code == 2 and "train.time_budget" in r.output, r.output


def test_a_budgeted_run_trains_the_planned_steps_and_keeps_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 100.0}))  # the choice's burst, for the estimate
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(80.0))  # what the plan is made from
    cfg = load_config(_budget_config(tmp_path, "r", budget="2s", num_images=0, trajectory_images=0, checkpoint_every=1000))
    said: list[str] = []
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    steps = int(2 * PLANNED_SHARE * 80.0 / 8)
    assert any(f"time budget 0m 02s: {steps:,} steps at the 80.0 images/s measured here" in s for s in said), said
    assert any("(an estimate: the steps are planned when training starts)" in s for s in said), said
    assert any(s.strip().startswith("measuring fp32") and "cached for later runs" in s for s in said), said
    assert any("over about 10 s of training, to plan its steps" in s for s in said), said
    assert any("of the budget" in s and "planned at 80.0" in s for s in said), said
    run = tmp_path / "runs" / "r"
    state = json.loads((run / "checkpoints" / f"step-{steps:08d}" / "state.json").read_text())
    assert state["time_plan"]["steps"] == steps and state["lr_decay_end"] == steps
    # the same run again, on a "machine" twice as fast: the recorded plan stands, nothing more is trained
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 160.0}))
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(160.0))
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "other-cache"))
    said.clear()
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    assert any("planned at the run's first start" in s for s in said), said
    assert not any("measuring" in s for s in said), said  # nothing is measured for a kept plan
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{steps:08d}"


def test_the_main_network_is_planned_from_the_time_the_guide_took(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 100.0, 4: 1e6}))  # the estimate: a guide of no time
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(10.0, setup_s=0.25))
    cfg = load_config(_budget_config(tmp_path, "g", budget="40s", num_images=0, trajectory_images=0,
                                     checkpoint_every=1000, extra=GUIDE))
    said: list[str] = []
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    run = tmp_path / "runs" / "g"
    last = sorted((run / "checkpoints").iterdir())[-1]
    recorded = json.loads((last / "state.json").read_text())["time_plan"]
    assert recorded["guide_trained"] and recorded["guide_s"] > 0 and recorded["setup_s"] == 0.25
    assert recorded["steps"] == int((40 * PLANNED_SHARE - recorded["guide_s"] - 0.25) * 10.0 / 8)
    assert last.name == f"step-{recorded['steps']:08d}"
    assert any("the guide took" in s for s in said), said
