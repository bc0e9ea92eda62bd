"""Refusals and warnings from the third round of hostile inputs (issue 21): each failed on 0.4.0 and is fixed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from runconfigs import cli_env, invoke, trained_tiny, write_config

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


def test_classifier_free_guidance_without_label_dropout_is_warned_about(tmp_path):
    """Issue 42: label_dropout = 0 never trains the null class that classifier-free guidance mixes in; validate
    and run said nothing and sampled with it."""
    cfg = write_config(tmp_path, "cfg0", epochs=1, num_images=0, trajectory_images=0)
    cfg.write_text(
        cfg.read_text() + '\n[conditioning]\nkind = "class"\nlabel_dropout = 0.0\n\n[guidance]\nweight = 3.0\n'
    )
    for command in ("validate", "run"):
        args = [command, str(cfg)] + (["--no-timing"] if command == "validate" else [])
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        assert "label_dropout = 0 never trains" in r.output, (command, r.output)
    cfg.write_text(cfg.read_text().replace("label_dropout = 0.0", "label_dropout = 0.1"))
    assert "never trains" not in invoke("validate", str(cfg), "--no-timing").output


def test_sample_classes_beyond_the_data_are_refused_before_training(tmp_path):
    """Issue 42: sample.classes = [7] on data of four classes passed validate, and run failed only after training."""
    cfg = write_config(tmp_path, "cls7", epochs=1, num_images=4, trajectory_images=0)
    cfg.write_text(
        cfg.read_text().replace("[sample]", "[sample]\nclasses = [7]") + '\n[conditioning]\nkind = "class"\n'
    )
    for command in ("validate", "run"):
        r = invoke(command, str(cfg))
        assert r.exit_code == 2 and "sample.classes = [7]: the data has 4 classes" in r.output, (command, r.output)
    assert not (tmp_path / "runs" / "cls7" / "checkpoints").exists()


def test_a_guidance_weight_that_blows_up_the_draw_is_named(tmp_path):
    """Issue 42: sample --guidance 1e308 blamed the built-in sampler for the non-finite images."""
    run = trained_tiny(tmp_path, "gw", "--set", 'conditioning.kind="class"')
    r = invoke("sample", str(run), "--num", "2", "--guidance", "1e308", "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "guidance.weight = 1e+308 drove the draw to non-finite values" in r.output, r.output


def test_a_run_name_too_long_for_the_file_system_is_one_line(tmp_path):
    """Issue 42 (a regression of round 3): the clean-up of the refused run failed on the same name, two tracebacks."""
    cfg = write_config(tmp_path, "long", epochs=1, num_images=0, trajectory_images=0)
    r = invoke("run", str(cfg), "--set", f'run.name="{"n" * 300}"')
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "cannot write the run directory" in r.output, r.output


def test_bench_refuses_an_out_that_is_a_folder_before_measuring(tmp_path, monkeypatch):
    """Issue 42: bench --out FOLDER measured for minutes, then lost the figures to an IsADirectoryError."""
    import ddpmkit.benchmark.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured before checking --out"))
    (tmp_path / "out.json").mkdir()
    cfg = write_config(tmp_path, "b")
    r = invoke("bench", str(cfg), "--out", str(tmp_path / "out.json"))
    assert r.exit_code == 2 and "--out" in r.output and "is a folder" in r.output, r.output


@pytest.mark.parametrize(
    "widths, needle",
    [
        ("1e-300", "at least 0.001"),
        ("1e-6", "at least 0.001"),
        ("0.0501,0.0504", "both stored as sigma-0.050"),
    ],
)
def test_ema_widths_that_cannot_be_told_apart_are_refused(widths, needle, tmp_path):
    """Issue 42: 1e-300 overflowed, 1e-6 was written as sigma-0.000, and 0.0501 and 0.0504 replaced each other."""
    r = invoke("ema", str(tmp_path / "no-run"), "--sigma-rel", widths)
    assert r.exit_code == 2 and needle in r.output, r.output
    cfg = write_config(tmp_path, "pe")
    cfg.write_text(cfg.read_text() + f"\n[train.posthoc_ema]\nenabled = true\nsigma_rels = [{widths}]\n")
    r = invoke("validate", str(cfg), "--no-timing")
    assert r.exit_code == 2 and needle in r.output, r.output


def test_epochs_that_end_before_max_steps_are_said(tmp_path):
    """Issue 42: --set train.max_steps=400 on a 2-epoch config trained 8 steps without saying why."""
    cfg = write_config(tmp_path, "cap", epochs=1, num_images=0, trajectory_images=0)
    r = invoke("run", str(cfg), "--set", "train.max_steps=400")
    assert r.exit_code == 0, r.output
    assert "steps in all (1 epochs, which end before train.max_steps = 400" in r.output, r.output


def test_validate_says_the_download_as_the_config_has_it(tmp_path):
    """Issue 42: with data.download = true, validate said 'MNIST not found ... and data.download is false'."""
    cfg = tmp_path / "dl.toml"
    cfg.write_text(f'[run]\nname = "dl"\ndir = "{tmp_path / "runs"}"\n\n[data]\nroot = "{tmp_path / "none"}"\n')
    r = invoke("validate", str(cfg), "--no-timing")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "downloads it (data.download)" in text and "download is false" not in text, r.output
