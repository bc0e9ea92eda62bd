"""The NaN policy: a non-finite loss or gradient never reaches the weights; halt names the last good
checkpoint and the advice it prints recovers the run; ``train.nonfinite = "skip"`` skips up to a cap."""

from __future__ import annotations

import json
import math

import pytest
import torch
from runconfigs import ddpmkit, invoke, write_config
from safetensors.torch import load_file

import ddpmkit.training.loop as train_module
from ddpmkit.errors import TrainingDiverged
from ddpmkit.run.config import load_config
from ddpmkit.training.runner import run_config

pytestmark = pytest.mark.usefixtures("one_thread")


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def _poison(monkeypatch, from_call: int, to_call: int = 10**9, where: str = "loss") -> None:
    """Make training steps from_call..to_call (1-based) produce a NaN loss, or NaN gradients with a finite loss."""
    real = train_module.training_loss
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        loss = real(model, *args, **kwargs)
        if from_call <= calls["n"] <= to_call:
            if where == "loss":
                return loss * math.nan
            return _NanGradient.apply(loss)  # the loss stays finite; its gradient is NaN
        return loss

    monkeypatch.setattr(train_module, "training_loss", poisoned)


def _cfg(tmp_path, name, *sets, epochs=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(
        tmp_path, name, epochs=epochs, checkpoint_every=2, num_images=0, trajectory_images=0, dropout=0.0
    )
    return load_config(path, list(sets))


def _run(cfg) -> int:
    return run_config(cfg)


def test_halt_stops_before_the_bad_update_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    clean = _cfg(tmp_path / "a", "clean", epochs=1)
    assert _run(clean) == 0
    _poison(monkeypatch, from_call=3)
    cfg = _cfg(tmp_path / "b", "clean", epochs=1)
    with pytest.raises(TrainingDiverged) as info:
        _run(cfg)
    message = str(info.value)
    assert "the loss became nan at step 3" in message and "step-00000002" in message and "--fresh" in message
    ckpts = sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002"]  # nothing written from the bad step
    a = load_file(clean.run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
    b = load_file(cfg.run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skip_leaves_the_weights_untouched_and_halts_at_the_cap(tmp_path, monkeypatch):
    _poison(monkeypatch, from_call=3, to_call=3)
    cfg = _cfg(tmp_path, "skip", "train.nonfinite=skip")
    assert _run(cfg) == 0
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    final = sorted((cfg.run_dir / "checkpoints").glob("step-*"))[-1]
    assert all(bool(torch.isfinite(v).all()) for v in load_file(final / "model.safetensors").values())

    monkeypatch.undo()
    _poison(monkeypatch, from_call=2)
    cfg = _cfg(tmp_path / "cap", "cap", "train.nonfinite=skip", "train.max_nonfinite_skips=3")
    with pytest.raises(TrainingDiverged, match="at step 5 after 3 skipped steps in a row"):
        _run(cfg)


def test_nan_gradients_with_a_finite_loss_are_caught_too(tmp_path, monkeypatch):
    _poison(monkeypatch, from_call=3, where="grad")
    cfg = _cfg(tmp_path, "grad")
    with pytest.raises(TrainingDiverged, match="at step 3"):
        _run(cfg)
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("step-*")) == ["step-00000002"]


def test_following_the_divergence_advice_recovers_the_run(tmp_path):
    cfg = write_config(tmp_path, "boom", epochs=2, checkpoint_every=1, num_images=4, trajectory_images=0)
    cfg.write_text(cfg.read_text().replace("lr = 1e-3", "lr = 1e30").replace("grad_clip = 1.0\n", ""))
    r = ddpmkit("run", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "run again with --fresh" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for ckpt in (tmp_path / "runs" / "boom" / "checkpoints").glob("step-*"):  # none holds non-finite weights
        assert all(bool(torch.isfinite(v).all()) for v in load_file(ckpt / "model.safetensors").values())
    r = invoke("run", str(cfg), "--fresh", "--set", "train.lr=1e-3")  # the advice (in-process: only it differs)
    assert r.exit_code == 0, r.output
    images = __import__("numpy").load(tmp_path / "runs" / "boom" / "samples.npz")["images"]
    assert images.shape[0] == 4 and 0 < images.mean() < 255
