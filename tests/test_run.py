"""`ddpmkit run` and `ddpmkit sample` as a user runs them: outputs, resume, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runconfigs import REPO, cli_env, ddpmkit, invoke, write_config
from safetensors.torch import load_file


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines)]


def _final(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def test_smoke_config_runs_from_the_cli(tmp_path):
    result = ddpmkit("run", str(REPO / "configs" / "smoke.toml"), "--set", f"run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "smoke"
    for name in ("samples.png", "samples.npz", "trajectory.png", "metrics.jsonl", "config.json"):
        assert (run / name).exists(), name
    images = np.load(run / "samples.npz")["images"]
    assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8
    state = json.loads((_final(run) / "state.json").read_text())
    manifest = state["manifest"]
    assert manifest["plugins"]["denoiser"]["distribution"] == "ddpmkit" and manifest["seed"] == 0
    assert {"ddpmkit", "torch", "python", "dataset_fingerprint"} <= set(manifest)
    assert state["identity"]["denoiser.name"] == "ddpmkit:unet" and len(state["identity_sha256"]) == 64
    assert state["components"] == {
        "schedule": "ddpmkit:linear",
        "denoiser": "ddpmkit:unet",
        "sampler": "ddpmkit:ddpm",
        "objective": "ddpmkit:ddpm",
    }
    assert state["prediction"] == "epsilon"
    assert "steps in all" in result.stdout and "parameters" in result.stdout


def test_sample_command_png_and_npz(tmp_path):
    cfg = write_config(tmp_path, "s", num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0  # in-process; the PNG below goes through a real process
    run = tmp_path / "runs" / "s"
    out = tmp_path / "x.npz"
    r = invoke("sample", str(run), "--num", "5", "--batch-size", "2", "--seed", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    a = np.load(out)["images"]
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
    # same seed, a checkpoint dir instead of the run dir, same images; raw weights differ
    out2 = tmp_path / "y.npz"
    assert (
        invoke(
            "sample", str(_final(run)), "--num", "5", "--batch-size", "2", "--seed", "3", "--out", str(out2)
        ).exit_code
        == 0
    )
    assert np.array_equal(a, np.load(out2)["images"])
    out3 = tmp_path / "z.npz"
    assert (
        invoke(
            "sample", str(run), "--num", "5", "--batch-size", "2", "--seed", "3", "--raw", "--out", str(out3)
        ).exit_code
        == 0
    )
    assert not np.array_equal(a, np.load(out3)["images"])
    png = tmp_path / "g.png"
    r = ddpmkit("sample", str(run), "--num", "4", "--out", str(png), "--set", "sampler.options.variance=posterior")
    assert r.returncode == 0 and png.stat().st_size > 0


@pytest.mark.parametrize(
    "args, needle, real",
    [  # real: through a real process (the rest in-process: the same one line, without a start-up each)
        (["sample", "{tmp}/runs/none"], "no such run", True),
        (["sample", "{tmp}/empty"], "no complete checkpoint", False),
        (["sample", "{tmp}/runs/f", "--out", "{tmp}/x.jpg"], ".png or .npz", False),
        (["run", "{cfg}", "--set", "train.nope=1"], "train.nope: unknown key", True),
        (["run", "{cfg}", "--set", "train.batch_size=-3"], "--set train.batch_size=-3", False),
        (["run", "{cfg}", "--set", "run.dir={tmp}/file.txt/runs"], "cannot write the run directory", True),
        (
            ["run", "{cfg}", "--set", "data.dataset=mnist", "--set", "data.download=false", "--data-root", "{tmp}"],
            "MNIST not found",
            False,
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, needle, real):
    cfg = write_config(tmp_path, "f")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("")
    args = [a.format(tmp=tmp_path, cfg=cfg) for a in args]
    if real:
        r = ddpmkit(*args)
        code, err = r.returncode, r.stderr
    else:
        result = invoke(*args)
        code, err = result.exit_code, result.output
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_resume_refuses_a_different_model_and_allows_more_epochs(tmp_path):
    cfg = write_config(tmp_path, "r", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0  # in-process: what is tested is what resume decides
    r = invoke("run", str(cfg), "--set", "denoiser.options.dropout=0.2", "--set", "schedule.options.beta_end=0.1")
    assert r.exit_code == 2
    assert "denoiser.options.dropout" in r.output and "schedule.options.beta_end" in r.output and "--fresh" in r.output
    r = invoke("run", str(cfg), "--set", "train.epochs=2")
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output
    assert [s for s, _ in _losses(tmp_path / "runs" / "r")] == list(range(1, 9))
    r = invoke("run", str(cfg), "--fresh", "--set", "denoiser.options.dropout=0.2")
    assert r.exit_code == 0 and "resuming" not in r.output


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """A run that would take days says so (suggesting the CPU config); SIGTERM then stops it cleanly."""
    cfg = write_config(tmp_path, "term", epochs=10**7, checkpoint_every=10**9, num_images=0, trajectory_images=0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpmkit", "run", str(cfg)],
        cwd=REPO,
        env=cli_env(COLUMNS="200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # the plan, then the measured speed and the warning, then SIGTERM
        seen.append(line)
        if "configs/mnist-cpu.toml" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 130, (out, err)
    assert "measured" in out and "images/s" in out and "warning" in out
    assert "interrupted" in out and "Traceback" not in err
    ckpt = _final(tmp_path / "runs" / "term")
    step = int(ckpt.name.split("-")[1])
    assert step >= 10
    assert _losses(tmp_path / "runs" / "term")[-1][0] == step


def _run_until_killed(cfg: Path, run_dir: Path, min_step: int) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpmkit", "run", str(cfg)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            done = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
            if done and max(done) >= min_step:
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()}")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_kill_and_resume_is_bit_for_bit(tmp_path):
    """SIGKILL at an arbitrary moment, resume: weights, EMA and loss trace equal an uninterrupted run."""
    common = dict(epochs=40, checkpoint_every=7, num_images=0, trajectory_images=0, dropout=0.1)
    whole = write_config(tmp_path / "a", "whole", **common) if (tmp_path / "a").mkdir() is None else None
    broken = write_config(tmp_path / "b", "whole", **common) if (tmp_path / "b").mkdir() is None else None
    assert ddpmkit("run", str(whole)).returncode == 0
    run_a, run_b = tmp_path / "a" / "runs" / "whole", tmp_path / "b" / "runs" / "whole"

    killed_at = _run_until_killed(broken, run_b, min_step=14)
    assert killed_at < 160
    r = ddpmkit("run", str(broken))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout

    fa, fb = _final(run_a), _final(run_b)
    assert fa.name == fb.name == "step-00000160"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(fa / name), load_file(fb / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    opt_a = torch.load(fa / "optimizer.pt", weights_only=True)
    opt_b = torch.load(fb / "optimizer.pt", weights_only=True)
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])
    assert _losses(run_a) == _losses(run_b)
    assert len(_losses(run_b)) == 160


def test_a_diverging_run_stops_with_one_line(tmp_path):
    cfg = write_config(tmp_path, "nan", epochs=1, checkpoint_every=2, num_images=0, trajectory_images=0)
    text = cfg.read_text().replace("lr = 1e-3", "lr = 1e30").replace("grad_clip = 1.0\n", "")
    cfg.write_text(text)
    r = ddpmkit("run", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the loss became" in r.stderr and "lower train.lr" in r.stderr.lower() and "Traceback" not in r.stderr


def _lock(run_dir: Path, pid: int, host: str | None = None) -> Path:
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier"}))
    return path


def test_a_run_held_by_a_live_process_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    cfg = write_config(tmp_path, "locked", epochs=1, num_images=0, trajectory_images=0)
    run_dir = tmp_path / "runs" / "locked"
    lock = _lock(run_dir, os.getpid())  # this test's process: alive, and not the one that will run
    r = ddpmkit("run", str(cfg))
    assert r.returncode == 2 and not (run_dir / "checkpoints").exists()
    assert f"is being written by ddpmkit process {os.getpid()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    _lock(run_dir, os.getpid(), host="another-machine")  # another host: its process cannot be checked
    r = ddpmkit("run", str(cfg))
    assert r.returncode == 2 and "another-machine" in r.stderr and f"delete {lock}" in r.stderr

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(run_dir, gone.pid)  # its process has exited: stale
    r = ddpmkit("run", str(cfg))
    assert r.returncode == 0, r.stderr
    assert not lock.exists()  # released at the end


@pytest.mark.slow
def test_two_processes_on_one_run_the_second_refuses(tmp_path):
    cfg = write_config(tmp_path, "two", epochs=400, checkpoint_every=5, num_images=0, trajectory_images=0)
    run_dir = tmp_path / "runs" / "two"
    first = subprocess.Popen(
        [sys.executable, "-m", "ddpmkit", "run", str(cfg)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not list((run_dir / "checkpoints").glob("step-*")) and time.time() < deadline:
            time.sleep(0.05)
        second = ddpmkit("run", str(cfg), "--set", "train.lr=0.5")
        assert second.returncode == 2 and f"ddpmkit process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)  # stops at the next step, checkpointing
        first.wait(timeout=120)
    steps = [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step logged twice
    assert not (run_dir / "run.lock").exists()
