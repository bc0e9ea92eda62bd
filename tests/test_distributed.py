"""Multi-process training (torchrun, DDP, gloo on CPU): same losses as one process, rank 0 alone
writes, kill-and-resume is bit for bit, and a diverging run stops every rank."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runconfigs import REPO, cli_env, ddpmkit, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ddpmkit", "run"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _torchrun(cfg: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, str(cfg), *extra], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def test_two_processes_follow_one_and_only_rank_0_writes(tmp_path):
    """Class-conditional, so each rank also takes its slice of the very labels and label dropout."""
    common = dict(epochs=3, checkpoint_every=3, num_images=4, trajectory_images=0, dropout=0.0)
    one = write_config(tmp_path / "one", "r", **common) if (tmp_path / "one").mkdir() is None else None
    two = write_config(tmp_path / "two", "r", **common) if (tmp_path / "two").mkdir() is None else None
    for cfg in (one, two):
        cfg.write_text(cfg.read_text() + '\n[conditioning]\nkind = "class"\nlabel_dropout = 0.5\n')
    assert ddpmkit("run", str(one)).returncode == 0
    r = ddpmkit("run", str(two), "--nproc", "2")  # the convenience: launches torchrun
    assert r.returncode == 0, r.stderr
    assert "on 2 processes" in r.stdout and r.stdout.count("trained to step") == 1  # rank 1 prints nothing
    a, b = _losses(tmp_path / "one" / "runs" / "r"), _losses(tmp_path / "two" / "runs" / "r")
    assert [s for s, _ in b] == list(range(1, 13))  # every step logged once: one writer
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * la  # the same global batch and noise; only float sums reorder
    run = tmp_path / "two" / "runs" / "r"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "samples.npz",
        "samples.png",
    ]


def test_kill_and_resume_under_ddp_is_bit_for_bit(tmp_path):
    common = dict(epochs=24, checkpoint_every=5, num_images=0, trajectory_images=0, dropout=0.1)
    whole = write_config(tmp_path / "a", "k", **common) if (tmp_path / "a").mkdir() is None else None
    broken = write_config(tmp_path / "b", "k", **common) if (tmp_path / "b").mkdir() is None else None
    r = _torchrun(whole)
    assert r.returncode == 0, r.stderr
    run_b = tmp_path / "b" / "runs" / "k"
    proc = subprocess.Popen(
        [*TORCHRUN, str(broken)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(
            int(p.name.split("-")[1]) >= 20 for p in (run_b / "checkpoints").glob("step-*")
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        # torchrun alone: its workers run in sessions of their own, and must stop because it died
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    deadline = time.time() + 120  # they stop at the end of their step, checkpoint, and release the run
    while (run_b / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not (run_b / "run.lock").exists(), "the workers kept running after their launcher was killed"
    r = _torchrun(broken)
    assert r.returncode == 0, r.stderr
    resumed = re.search(r"resuming from .* \(step (\d+)\)", r.stdout)
    assert resumed and 20 <= int(resumed[1]) < 96, r.stdout  # from where it was killed, not from the end
    final = "step-00000096"
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "runs" / "k" / "checkpoints" / final / name)
        b = load_file(run_b / "checkpoints" / final / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _losses(tmp_path / "a" / "runs" / "k") == _losses(run_b)


def test_a_diverging_ddp_run_stops_every_rank_with_one_line(tmp_path):
    cfg = write_config(tmp_path, "nan", epochs=2, checkpoint_every=2, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text().replace("lr = 1e-3", "lr = 1e30").replace("grad_clip = 1.0\n", ""))
    r = ddpmkit("run", str(cfg), "--nproc", "2", timeout=180)  # no hang: every rank learns of it in one all-reduce
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr
    assert "the loss became nan" in r.stderr and "Traceback" not in r.stderr


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    cfg = write_config(tmp_path, "odd", epochs=1, num_images=0, trajectory_images=0)
    r = ddpmkit("run", str(cfg), "--nproc", "3")
    assert r.returncode == 2 and "does not split evenly over 3 processes" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_locked_run_refuses_every_process_with_one_line(tmp_path):
    import socket

    cfg = write_config(tmp_path, "locked", epochs=1, num_images=0, trajectory_images=0)
    run_dir = tmp_path / "runs" / "locked"
    run_dir.mkdir(parents=True)
    (run_dir / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    r = ddpmkit("run", str(cfg), "--nproc", "2", timeout=180)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"ddpmkit process {os.getpid()}" in r.stderr and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("failing_rank", ["0", "1"])
def test_an_error_on_one_rank_before_training_stops_both_with_one_line(failing_rank, tmp_path):
    """A failure that only one process meets before the first step (its data, say) must not leave the
    other waiting in a collective: both stop, within the test's timeout, with that one line."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get('RANK') == '{failing_rank}':\n"
        "    import ddpmkit.training.runner as r\n"
        "    from ddpmkit.errors import DataError\n"
        "    def fail(*a, **k):\n"
        "        raise DataError('injected: this process cannot read its data')\n"
        "    r.load_dataset = fail\n"
    )
    cfg = write_config(tmp_path, "one", epochs=1, num_images=0, trajectory_images=0)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = ddpmkit("run", str(cfg), "--nproc", "2", env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == "error: injected: this process cannot read its data", r.stderr
    assert not (tmp_path / "runs" / "one" / "checkpoints").exists()


def test_the_guide_trains_under_ddp_before_the_main_network(tmp_path):
    cfg = write_config(tmp_path, "g", epochs=1, num_images=4, trajectory_images=0, dropout=0.0)
    cfg.write_text(cfg.read_text() + "\n[guidance]\nweight = 2.0\nsteps = 2\n")
    r = ddpmkit("run", str(cfg), "--nproc", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("trained to step 2 ") == 1 and r.stdout.count("trained to step 4 ") == 1  # rank 0 only
    run = tmp_path / "runs" / "g"
    assert (run / "guide" / "checkpoints" / "step-00000002").is_dir() and (run / "samples.npz").exists()
