"""Atomic checkpoints: validated load, fall-back to the previous complete one, keep-last-K."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpmkit.errors import CheckpointError
from ddpmkit.run.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dirs,
)


def _save(run_dir: Path, step: int, keep: int = 3) -> Path:
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return save_checkpoint(
        run_dir,
        step,
        model_state=model.state_dict(),
        ema_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        state={"note": "test"},
        keep=keep,
    )


def test_round_trip(tmp_path):
    path = _save(tmp_path, 5)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 5 and ckpt.state["note"] == "test"
    torch.manual_seed(5)
    expected = torch.nn.Linear(4, 3).state_dict()
    assert set(ckpt.weights("model")) == set(expected)
    opt_state = ckpt.optimizer_state()
    assert opt_state["state"][0]["step"].item() == 1.0
    # the optimizer file loads under weights_only=True (no pickled code)
    torch.load(path / OPTIMIZER_FILE, weights_only=True)


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000004", "step-00000005"]


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: (p / MODEL_FILE).write_bytes((p / MODEL_FILE).read_bytes()[:50]), "truncated"),
        (lambda p: (p / EMA_FILE).unlink(), "missing"),
        (lambda p: (p / OPTIMIZER_FILE).write_bytes(os.urandom((p / OPTIMIZER_FILE).stat().st_size)), "corrupt"),
        (lambda p: (p / STATE_FILE).write_text("{not json"), "unreadable"),
        (lambda p: (p / STATE_FILE).unlink(), "missing"),
    ],
)
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage, needle):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    damage(newest)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(newest)
    assert needle in str(err.value) and str(newest) in str(err.value)
    warnings = []
    latest = latest_checkpoint(tmp_path, warnings.append)
    assert latest is not None and latest.step == 1
    assert len(warnings) == 1 and needle in warnings[0]
    assert find_checkpoint(tmp_path).step == 1


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        find_checkpoint(tmp_path / "nope")


KILL_DURING_WRITE = r"""
import sys, time
from pathlib import Path
import torch
import ddpmkit.run.checkpoint as ck

run = Path(sys.argv[1])
m = torch.nn.Linear(4, 3)
opt = torch.optim.Adam(m.parameters())
ck.save_checkpoint(run, 1, model_state=m.state_dict(), ema_state=m.state_dict(),
                   optimizer_state=opt.state_dict(), state={}, keep=3)
real = ck._write_file
def slow(path, data):
    if path.name == ck.EMA_FILE:      # the second file of checkpoint 2: stop half-way
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush()
        print("WRITING", flush=True)
        time.sleep(600)
    return real(path, data)
ck._write_file = slow
ck.save_checkpoint(run, 2, model_state=m.state_dict(), ema_state=m.state_dict(),
                   optimizer_state=opt.state_dict(), state={}, keep=3)
"""


def test_sigkill_during_checkpoint_write(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_WRITE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "step-00000001" in leftovers and "step-00000002" not in leftovers
    assert any(name.startswith(".tmp-") for name in leftovers)
    latest = latest_checkpoint(tmp_path)
    assert latest.step == 1  # the complete previous checkpoint, intact
    # the next save clears the partial directory
    _save(tmp_path, 3)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
