"""Refusals and warnings from the third round of hostile inputs (issue 21): each failed on 0.4.0 and is fixed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from runconfigs import cli_env, invoke, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def test_rotation_counts_only_checkpoints_that_verify(tmp_path):
    """A broken checkpoint newer than the run's own is neither counted nor deleted, and no good one is lost."""
    cfg = write_config(tmp_path, "rot", epochs=1, num_images=0, trajectory_images=0, checkpoint_every=1)
    cfg.write_text(cfg.read_text().replace("keep_checkpoints = 3", "keep_checkpoints = 2"))
    assert invoke("run", str(cfg)).exit_code == 0
    run = tmp_path / "runs" / "rot"
    assert _steps(run) == ["step-00000003", "step-00000004"]
    broken = run / "checkpoints" / "step-00000010"
    shutil.copytree(run / "checkpoints" / "step-00000003", broken)  # says step 3: not a checkpoint of step 10
    r = invoke("run", str(cfg), "--set", "train.epochs=2")  # resumes from 4, writes 5 .. 8
    assert r.exit_code == 0, r.output
    assert "skipping broken checkpoint" in r.output and "step-00000010" in r.output
    assert _steps(run) == ["step-00000007", "step-00000008", "step-00000010"]
    assert "not counted as one of the 2 checkpoints kept, and left in place" in r.output


@pytest.mark.parametrize("weight", ["0", "0.5", "-1"])
def test_a_guidance_weight_below_one_is_refused(weight, tmp_path):
    cfg = write_config(tmp_path, "gw")
    r = invoke("validate", str(cfg), "--no-timing", "--set", f"guidance.weight={weight}")
    assert r.exit_code == 2 and "guidance.weight: must be at least 1" in r.output, r.output
    assert "1 turns guidance off" in r.output


def test_sweep_refuses_a_guidance_weight_below_one(tmp_path):
    r = invoke("sweep", str(tmp_path), "--guidance", "1,0")
    assert r.exit_code == 2 and "at least 1 (1 is off)" in r.output, r.output


def test_more_processes_than_memory_holds_are_refused_before_any_launch(tmp_path):
    cfg = write_config(tmp_path, "np")
    r = invoke("run", str(cfg), "--nproc", "1000")
    assert r.exit_code == 2, r.output
    assert "--nproc 1000: 1000 processes would need about" in r.output and "CPU cores" in r.output
    assert not (tmp_path / "runs").exists()


def test_more_processes_than_cores_are_warned_about(monkeypatch):
    from ddpmkit.commands import run as run_command

    said = []
    monkeypatch.setattr(run_command, "warn", said.append)
    monkeypatch.setattr(run_command.os, "cpu_count", lambda: 2)
    run_command._check_process_count(3, "cpu")
    assert said and "--nproc 3: this machine has 2 CPU cores" in said[0] and "slower" in said[0]


def test_validate_with_an_enormous_plan_answers_at_once(tmp_path):
    cfg = write_config(tmp_path, "big")
    started = time.perf_counter()
    r = invoke("validate", str(cfg), "--no-timing", "--set", "train.epochs=1000000000")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - started < 60  # the EMA horizon in closed form, not a loop over the steps
    too_many = invoke("validate", str(cfg), "--no-timing", "--set", "train.epochs=1000000000000")
    assert too_many.exit_code == 2 and "train.epochs" in too_many.output, too_many.output
    too_many = invoke("validate", str(cfg), "--no-timing", "--set", "train.max_steps=1000000000000")
    assert too_many.exit_code == 2 and "train.max_steps" in too_many.output, too_many.output


def test_the_ema_horizon_in_closed_form_matches_the_updates():
    from ddpmkit.training.preflight import EMA_WARMUP_GAMMA, EMA_WARMUP_POWER, ema_schedule

    for steps in (0, 1, 2, 7, 500):
        share, last = 1.0, 0.999
        for k in range(steps):  # as the training loop updates timm's ModelEmaV3 with warm-up
            last = 0.0 if k == 0 else min(0.999, 1 - (1 + k / EMA_WARMUP_GAMMA) ** -EMA_WARMUP_POWER)
            share *= last
        assert ema_schedule(0.999, True, steps) == pytest.approx((share, last)), steps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/full is Linux's")
def test_a_full_stdout_does_not_stop_training(tmp_path):
    cfg = write_config(tmp_path, "full", epochs=1, num_images=2, trajectory_images=0)
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "ddpmkit", "run", str(cfg)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            timeout=300,
        )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("cannot write to standard output") == 1, r.stderr
    assert "trained to step 4" in r.stderr and (tmp_path / "runs" / "full" / "samples.png").is_file()


def test_a_one_step_schedule_warns_in_run_as_in_validate(tmp_path):
    cfg = write_config(tmp_path, "t1", epochs=1, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text().replace("trajectory_steps = [0, 5, 10, 19]", "trajectory_steps = [0]"))
    r = invoke("run", str(cfg), "--set", "schedule.options.num_timesteps=1")
    assert r.exit_code == 0, r.output
    assert "warning: x_T still holds signal" in r.output, r.output


def test_a_refusal_before_training_leaves_no_empty_run_folder(tmp_path):
    cfg = write_config(tmp_path, "mem")
    r = invoke("run", str(cfg), "--set", "schedule.options.num_timesteps=1000000000")
    assert r.exit_code == 2 and "needs about" in r.output, r.output
    assert not (tmp_path / "runs" / "mem").exists() and not (tmp_path / "runs").exists()


def test_a_bad_device_is_reported_as_the_option_given(tmp_path):
    cfg = write_config(tmp_path, "dev")
    r = invoke("run", str(cfg), "--device", "cuda:-1")
    assert r.exit_code == 2 and "--device cuda:-1" in r.output and "--set" not in r.output, r.output


def test_an_empty_bench_mode_is_named_as_empty(tmp_path):
    cfg = write_config(tmp_path, "bm")
    r = invoke("bench", str(cfg), "--modes", "fp32,")
    assert r.exit_code == 2 and "--modes fp32,: an empty mode" in r.output, r.output
