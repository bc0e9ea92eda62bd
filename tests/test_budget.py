"""``train.time_budget``: steps planned from the measured rate (a fake timer here), the guide's time inside the
budget, the plan recorded and kept on resume, and the learning-rate schedule laid over the planned steps."""

from __future__ import annotations

import json

import pytest
import torch
from runconfigs import invoke, write_config

import ddpmkit.training.autotune as autotune
import ddpmkit.training.budget as budget
import ddpmkit.training.loop as loop
from ddpmkit.run.checkpoint import load_checkpoint
from ddpmkit.run.config import load_config
from ddpmkit.training.budget import PLANNED_SHARE, REPLANNED_SHARE, TimePlan, choose_model, plan
from ddpmkit.training.loop import learning_rate
from ddpmkit.training.runner import RunReport, run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _budget_config(tmp_path, name="b", budget="2s", extra="", **values):
    path = write_config(tmp_path, name, **values)
    path.write_text(
        path.read_text().replace("keep_checkpoints = 3", f'keep_checkpoints = 3\ntime_budget = "{budget}"') + extra
    )
    return path


def _fake(rate_by_channels):
    """A timer: images/s by the model's first channel count (the guide is the smaller network)."""
    return lambda cfg, modes, device: rate_by_channels[cfg.denoiser.options["channels"][0]]


def _fake_steady(ips, setup_s=0.0):
    """A timer of steady training: ``ips`` images/s after ``setup_s`` seconds, whatever the choice expected."""
    return lambda cfg, modes, device, expected: (ips, setup_s)


GUIDE = (
    "\n[guidance]\nweight = 2.0\nsteps = 10\n\n[guidance.denoiser_options]\nchannels = [4, 8, 16, 16]\nnum_groups = 2\n"
)


def test_the_plan_fits_the_budget_with_the_guide_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(_budget_config(tmp_path, budget="1m", extra=GUIDE))
    assert cfg.train.time_budget == 60
    p = plan(cfg, torch.device("cpu"), timer=_fake({8: 100.0, 4: 400.0}))
    assert p.guide_s == pytest.approx(10 * 8 / 400.0)
    assert p.steps == int((60 * PLANNED_SHARE - p.guide_s) * 100.0 / 8) and p.images_per_s == 100.0
    # the plan the run keeps: the guide's real time and steady training measured when the main network starts
    final = plan(
        cfg,
        torch.device("cpu"),
        timer=_fake({8: 100.0, 4: 400.0}),
        final=True,
        guide_took=3.0,
        rate_timer=_fake_steady(90.0, setup_s=2.0),
    )
    assert final.steps == int((60 * PLANNED_SHARE - 3.0 - 2.0) * 90.0 / 8)
    assert (final.guide_s, final.setup_s, final.guide_trained) == (3.0, 2.0, True)
    assert (
        final.describe()
        == f"time budget 1m 00s: the guide took 0m 03s, then {final.steps:,} steps at the 90.0 images/s measured here "
        "after 2 s of set-up"
    )
    capped = load_config(_budget_config(tmp_path, "c", budget="1m"), ["train.max_steps=7"])
    assert plan(capped, torch.device("cpu"), timer=_fake({8: 100.0})).steps == 7


def test_validate_times_the_guide_for_its_own_steps_when_the_budget_plans_fewer(tmp_path, monkeypatch):
    """The guide trains its guidance.steps before the main network's steps are capped by the plan; validate timed it
    for the main network's planned steps (on an AVX2-only CPU in bf16: 1 min 17 s said, 9 min planned)."""
    from ddpmkit.run.components import build_checked
    from ddpmkit.training.preflight import preflight

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 8.0, 4: 8.0}))  # one step a second, either network
    cfg = load_config(
        _budget_config(tmp_path, budget="16s", extra=GUIDE.replace("steps = 10", "steps = 12"), epochs=10)
    )
    findings = {f.label: f.text for f in preflight(cfg, build_checked(cfg))}
    assert "the guide about 0m 12s, then 2 steps" in findings["budget"], findings  # int(16 * 0.92 - 12)
    assert findings["guide"].startswith("about 0m 12s of training first"), findings
    assert findings["time"].startswith("about 0m 02s of training"), findings


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
    cfg = load_config(
        _budget_config(tmp_path, "r", budget="2s", num_images=0, trajectory_images=0, checkpoint_every=1000)
    )
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
    cfg = load_config(
        _budget_config(
            tmp_path, "g", budget="40s", num_images=0, trajectory_images=0, checkpoint_every=1000, extra=GUIDE
        )
    )
    said: list[str] = []
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    run = tmp_path / "runs" / "g"
    last = sorted((run / "checkpoints").iterdir())[-1]
    recorded = json.loads((last / "state.json").read_text())["time_plan"]
    assert recorded["guide_trained"] and recorded["guide_s"] > 0 and recorded["setup_s"] == 0.25
    assert recorded["steps"] == int((40 * PLANNED_SHARE - recorded["guide_s"] - 0.25) * 10.0 / 8)
    assert last.name == f"step-{recorded['steps']:08d}"
    assert any("the guide took" in s for s in said), said


SMALLER = (
    "\n[[train.smaller_models]]\ndenoiser_options = { channels = [4, 8, 16, 16], num_groups = 2 }\n"
    "guide_options = { channels = [2, 4, 8, 8], num_groups = 2 }\n"
)


def _sized_config(tmp_path, name, min_steps, budget="1m", extra=GUIDE, more=""):
    path = _budget_config(
        tmp_path, name, budget=budget, num_images=0, trajectory_images=0, checkpoint_every=1000, extra=extra + more
    )
    path.write_text(
        path.read_text().replace("keep_checkpoints = 3", f"keep_checkpoints = 3\nbudget_min_steps = {min_steps}")
    )
    return path


def test_a_budget_takes_the_first_smaller_model_it_buys_enough_steps_of(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    rates = {8: 100.0, 4: 400.0, 2: 1600.0}  # by the first channel count: main, guide / smaller main, smaller guide
    timed: list[int] = []

    def timer(cfg, modes, device):
        timed.append(cfg.denoiser.options["channels"][0])
        return rates[timed[-1]]

    smaller_twice = SMALLER + SMALLER.replace("[4, 8, 16, 16]", "[2, 4, 8, 8]")
    own = int((60 * PLANNED_SHARE - 10 * 8 / 400.0) * 100.0 / 8)  # about 680 steps of the configured model
    small = int((60 * PLANNED_SHARE - 10 * 8 / 1600.0) * 400.0 / 8)
    cfg = load_config(_sized_config(tmp_path, "a", own, more=SMALLER))
    choice = choose_model(cfg, torch.device("cpu"), timer=timer)
    assert (choice.index, choice.steps) == (0, [own]) and set(timed) == {8, 4}  # enough: nothing smaller is measured
    cfg = load_config(_sized_config(tmp_path, "b", own + 1, more=smaller_twice))
    choice = choose_model(cfg, torch.device("cpu"), timer=timer)
    assert (choice.index, choice.steps) == (1, [own, small])
    assert choice.describe(cfg) == (
        f"train.smaller_models[0] (channels = [4, 8, 16, 16], num_groups = 2): the budget buys about {own:,} steps of "
        f"the configured model, fewer than train.budget_min_steps = {own + 1:,}, and about {small:,} of this one"
    )
    picked = cfg.with_smaller_model(choice.index)
    assert picked.denoiser.options["channels"] == [4, 8, 16, 16] and picked.guidance.denoiser_options["channels"] == [
        2,
        4,
        8,
        8,
    ]
    assert picked.run_dir == cfg.run_dir and not picked.train.smaller_models and picked.train.max_steps is None
    capped = load_config(
        _sized_config(tmp_path, "b2", own + 1, more=SMALLER.replace("guide_options", "max_steps = 9\nguide_options"))
    )
    assert capped.with_smaller_model(1).train.max_steps == 9
    cfg = load_config(_sized_config(tmp_path, "c", 10**5, more=smaller_twice))  # none is enough: the last
    choice = choose_model(
        cfg, torch.device("cpu"), timer=lambda c, m, d: rates.get(c.denoiser.options["channels"][0], 1e4)
    )
    assert (
        choice.index == 2
        and len(choice.steps) == 3
        and "(the last offered: none reaches 100,000)" in choice.describe(cfg)
    )


def test_a_budgeted_run_trains_the_smaller_model_and_keeps_it_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 10.0, 4: 400.0, 2: 1e6}))
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(8.0))
    path = _sized_config(tmp_path, "s", 100, budget="20s", more=SMALLER)
    said: list[str] = []
    assert run_config(load_config(path), report=RunReport(info=said.append)) == 0
    assert any(s.startswith("model: train.smaller_models[0]") for s in said), said
    run = tmp_path / "runs" / "s"
    assert json.loads((run / "config.json").read_text())["denoiser"]["options"]["channels"] == [4, 8, 16, 16]
    assert json.loads((run / "guide" / "config.json").read_text())["denoiser"]["options"]["channels"] == [2, 4, 8, 8]
    last = sorted((run / "checkpoints").iterdir())[-1]
    assert json.loads((last / "state.json").read_text())["budget_model"]["index"] == 1
    # again on a "machine" fast enough for the configured model: the run's model stands (resume stays exact)
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 1e5, 4: 1e6, 2: 1e6}))
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "other-cache"))
    said.clear()
    assert run_config(load_config(path), report=RunReport(info=said.append)) == 0
    assert any("kept from the run's first start" in s and "smaller_models[0]" in s for s in said), said
    # --fresh chooses again
    said.clear()
    assert run_config(load_config(path), report=RunReport(info=said.append), fresh=True) == 0
    assert any(s.startswith("model: the configured one") for s in said), said
    assert json.loads((run / "config.json").read_text())["denoiser"]["options"]["channels"] == [8, 16, 32, 32]


@pytest.mark.parametrize(
    "more, needle",
    [
        ("", "train.smaller_models: needs train.budget_min_steps"),
        ("min", "train.smaller_models[0]: "),
    ],
)
def test_smaller_models_that_cannot_work_are_one_line(more, needle, tmp_path):
    if more == "min":
        path = _sized_config(
            tmp_path, "m", 10, more=SMALLER.replace("num_groups = 2 }\nguide", "num_groups = 3 }\nguide")
        )
    else:
        path = _budget_config(tmp_path, "m", extra=GUIDE + SMALLER)
    r = invoke("validate", str(path), "--no-timing")
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_speed_figures_far_off_the_steady_rate_are_forgotten(tmp_path, monkeypatch):
    """Figures measured while the machine was busy (or on another one) would steer every later estimate and model
    choice: the steady measurement when training starts forgets them when they are 2x or more off."""
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(_budget_config(tmp_path, "f", budget="1m"))
    said: list[str] = []
    with autotune.announced(said.append):
        plan(cfg, torch.device("cpu"), timer=_fake({8: 100.0}), final=True, rate_timer=_fake_steady(60.0))
        assert autotune.measured_rate(cfg, torch.device("cpu"), timer=_fake({8: 1.0}))[1] == 100.0  # 1.7x off: kept
        plan(cfg, torch.device("cpu"), timer=_fake({8: 100.0}), final=True, rate_timer=_fake_steady(400.0))
    assert any("were 4.0x off the 400.0 measured now: forgotten" in s for s in said), said
    assert autotune.measured_rate(cfg, torch.device("cpu"), timer=_fake({8: 300.0}))[1] == 300.0  # measured again
    assert plan(cfg, torch.device("cpu"), timer=_fake({8: 1.0})).images_per_s == 300.0  # and cached


def test_validate_names_the_model_the_budget_would_train(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 10.0, 4: 400.0, 2: 1e6}))
    r = invoke("validate", str(_sized_config(tmp_path, "v", 100, budget="20s", more=SMALLER)))
    assert r.exit_code == 0, r.output
    assert "train.smaller_models[0] (channels = [4, 8, 16, 16], num_groups = 2): the budget buys" in r.output
    assert "400.0 images/s measured at the run's batch" in r.output  # the time of the model that will train


def test_the_choice_measures_the_configured_model_for_real(tmp_path, monkeypatch):
    """No fake timer: the measurement's own config (a few steps, fallbacks and all) must build, and a trained run's
    saved config (its planned steps below budget_min_steps) must load again."""
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(_sized_config(tmp_path, "real", 10**6, budget="1h", more=SMALLER))
    choice = choose_model(cfg, torch.device("cpu"))
    assert choice.index == 1 and len(choice.steps) == 2 and all(n > 0 for n in choice.steps), choice
    kept = load_config(_sized_config(tmp_path, "own", 1, budget="1h", more=SMALLER), ["train.max_steps=3"])
    assert kept.with_smaller_model(0).train.smaller_models  # the configured model keeps its fallbacks, and loads


def test_the_replan_step_and_its_closed_form():
    made = TimePlan(60.0, 5000, 80.0, 5.0, 1.0, True)
    # 120 s of steps at 80 images/s, batch 8: 1,200; then the first checkpoint within as many steps again
    assert made.replan_step(8, 0, 1000) == 2000  # not at the checkpoint at 1,000: too soon to know the loop's rate
    assert made.replan_step(8, 0, 600) == 1200  # a checkpoint at 120 s: there
    assert made.replan_step(8, 0, 3000) == 1200  # the next checkpoint is too far off: at 120 s, without one
    assert made.replan_step(8, 700, 500) == 2000  # a resumed start: 120 s of its own steps first
    assert made.replan_step(8, 3750, 500) is None  # the run would end first
    assert TimePlan(60.0, 900, 80.0, 5.0).replan_step(8, 0, 5000) is None  # the run ends first
    new = made.replanned(1000, 100.0, 40.0, 8, None)
    assert new.steps == 1000 + int((60 * REPLANNED_SHARE - 5 - 40) * 100.0 / 8)
    assert (new.replanned_at, new.first_steps, new.loop_images_per_s, new.spent_s) == (1000, 5000, 100.0, 40.0)
    assert made.replanned(1000, 100.0, 40.0, 8, 1100).steps == 1100  # the config's cap holds
    assert made.replanned(1000, 100.0, 1e4, 8, None).steps == 1000  # out of time: it ends here
    assert new.replan_step(8, 0, 1000) is None  # once
    assert new.describe() == (
        f"time budget 1m 00s: the guide took 0m 05s, then 5,000 steps at the 80.0 images/s measured "
        f"here after 1 s of set-up; re-planned at step 1,000 from the loop's own 100.0 images/s: {new.steps:,} steps"
    )
    assert TimePlan(**new.record()) == new  # what a resumed run reads back


def _replanning(monkeypatch, at_ips=40.0):
    """Re-plan after 3 steps, at the first checkpoint after them (4), as if the loop had measured ``at_ips`` with no
    time spent: deterministic, where the loop's own rate is not."""
    monkeypatch.setattr(budget, "REPLAN_MIN_STEPS", 3)
    monkeypatch.setattr(budget, "REPLAN_AFTER_S", 1e-6)
    real = TimePlan.replanned
    monkeypatch.setattr(
        TimePlan, "replanned", lambda self, step, ips, spent, batch, cap: real(self, step, at_ips, 0.0, batch, cap)
    )


def test_the_loop_replans_once_from_its_own_rate_and_a_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 100.0}))
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(80.0))  # the plan: 18 steps
    _replanning(monkeypatch)
    first, new = int(2 * PLANNED_SHARE * 80.0 / 8), 4 + int(2 * REPLANNED_SHARE * 40.0 / 8)
    assert (first, new) == (18, 13)
    runs = {}
    for name in ("whole", "killed"):
        path = _budget_config(tmp_path, name, budget="2s", num_images=0, trajectory_images=0, checkpoint_every=4)
        path.write_text(path.read_text().replace("lr = 1e-3", 'lr = 1e-3\nlr_decay = "cosine"'))
        runs[name] = load_config(path)
    said: list[str] = []
    assert run_config(runs["whole"], report=RunReport(info=said.append)) == 0
    assert any(
        f"re-planned at step 4 from the loop's own 40.0 images/s: {new} steps (planned {first})" in s for s in said
    ), said
    assert any("of the budget" in s and "planned at 80.0, re-planned at step 4 at 40.0" in s for s in said), said
    whole = tmp_path / "runs" / "whole"
    state = json.loads((whole / "checkpoints" / f"step-{new:08d}" / "state.json").read_text())
    assert (
        state["lr_decay_end"] == new and state["time_plan"]["steps"] == new and state["time_plan"]["replanned_at"] == 4
    )
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, new + 1))
    cfg = runs["whole"].train
    for r in rows:  # the cosine decay over the first plan up to the re-plan, over the new one after it
        assert r["lr"] == pytest.approx(learning_rate(runs["whole"], r["step"] - 1, first if r["step"] <= 4 else new))
    assert cfg.lr_decay == "cosine" and rows[-1]["lr"] < rows[3]["lr"]

    # the same run killed at step 10 and resumed: the recorded new plan is kept (no second re-plan), bit for bit
    update = loop._Trainer.update

    def dies_at_10(self, *args, **kwargs):
        if self.step == 9:
            raise KeyboardInterrupt
        return update(self, *args, **kwargs)

    monkeypatch.setattr(loop._Trainer, "update", dies_at_10)
    assert run_config(runs["killed"], report=RunReport(info=lambda s: None)) != 0
    monkeypatch.setattr(loop._Trainer, "update", update)
    said.clear()
    assert run_config(runs["killed"], report=RunReport(info=said.append)) == 0
    assert any(
        "re-planned at step 4 from the loop's own 40.0 images/s" in s and "planned at the run's first start" in s
        for s in said
    ), said
    assert not any(s.strip().startswith("re-planned") for s in said), said
    killed = tmp_path / "runs" / "killed"
    a, b = (load_checkpoint(run / "checkpoints" / f"step-{new:08d}") for run in (whole, killed))
    for key, value in a.weights("model").items():
        assert torch.equal(value, b.weights("model")[key]), key


def test_a_start_refused_before_anything_trained_leaves_no_record_of_its_choice(tmp_path, monkeypatch):
    """The model choice is recorded before the guide trains (RUN/start.json); a start refused before anything
    trained removes it, so the next start chooses again instead of keeping figures from the refused one."""
    import ddpmkit.training.runner as runner
    from ddpmkit.errors import DataError

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 10.0, 4: 400.0, 2: 1e6}))
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(8.0))

    def no_data(*args, **kwargs):
        raise DataError("injected: the data is missing")

    monkeypatch.setattr(runner, "load_dataset", no_data)
    path = _sized_config(tmp_path, "r", 100, budget="20s", more=SMALLER)
    with pytest.raises(DataError):
        run_config(load_config(path))
    run = tmp_path / "runs" / "r"
    assert not (run / "start.json").exists() and not (run / "budget-model.json").exists()


def test_the_first_start_records_its_decisions_once_and_a_resume_reads_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 10.0, 4: 400.0, 2: 1e6}))
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(8.0))
    path = _sized_config(tmp_path, "w", 100, budget="20s", more=SMALLER)
    assert run_config(load_config(path)) == 0
    run = tmp_path / "runs" / "w"
    record = json.loads((run / "start.json").read_text())
    assert record["budget_model"]["index"] == 1 and record["time_plan"]["budget_s"] == 20.0
    last = load_checkpoint(sorted((run / "checkpoints").iterdir())[-1])
    assert last.start.budget_model == record["budget_model"] and last.start.time_plan["steps"] == last.step
    assert last.start.lr_decay_end == last.step


def test_a_run_of_0_12_with_budget_model_json_keeps_its_model(tmp_path, monkeypatch):
    """Runs from 0.10 to 0.12 recorded the model choice in RUN/budget-model.json: it is still read."""
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_measured_rate", _fake({8: 1e5, 4: 1e6, 2: 1e6}))  # the configured one fits
    monkeypatch.setattr(autotune, "_steady_rate", _fake_steady(8.0))
    path = _sized_config(tmp_path, "old", 100, budget="20s", more=SMALLER)
    cfg = load_config(path)
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    models = [m.model_dump(mode="json") for m in cfg.train.smaller_models]
    legacy = {"index": 1, "steps": [40, 900], "min_steps": 100, "smaller_models": models, "budget_s": 20.0}
    (run / "budget-model.json").write_text(json.dumps(legacy))
    said: list[str] = []
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    assert any("kept from the run's first start" in s and "smaller_models[0]" in s for s in said), said
    assert json.loads((run / "config.json").read_text())["denoiser"]["options"]["channels"] == [4, 8, 16, 16]


def test_on_a_loaded_machine_the_fallback_is_the_model_that_buys_the_most_steps(tmp_path, monkeypatch):
    """Issue 42: "about 43 steps of the configured model ... and about 41 of this one": the smaller model was taken
    although it bought fewer steps (its measurement ran beside other work). None reaching budget_min_steps, the one
    that buys the most is trained."""
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    busy = (
        SMALLER.replace("[4, 8, 16, 16]", "[X]")
        .replace("[2, 4, 8, 8]", "[4, 8, 16, 16]")
        .replace("[X]", "[2, 4, 8, 8]")
    )
    cfg = load_config(_sized_config(tmp_path, "busy", 10**5, more=busy))
    # by the first channel count: the configured main network, both guides, and the smaller main network measured
    # while the machine was busy (slower than the larger one)
    rates = {8: 100.0, 4: 400.0, 2: 60.0}
    choice = choose_model(
        cfg, torch.device("cpu"), timer=lambda c, modes, device: rates[c.denoiser.options["channels"][0]]
    )
    assert choice.index == 0 and choice.steps[0] > choice.steps[1], choice
    assert "(none reaches 100,000: this one buys the most)" in choice.describe(cfg)
